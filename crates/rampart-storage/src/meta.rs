//! Small files replaced atomically: the vote, the log's purge point, and similar state that is
//! rewritten whole and must never be seen half-written.
//!
//! # Format (version 1, all integers little-endian)
//!
//! | bytes  | field                                   |
//! |--------|-----------------------------------------|
//! | 0..8   | magic `b"RPMETA\0\0"`                   |
//! | 8..12  | format version, `u32` = 1               |
//! | 12..16 | crc32c (Castagnoli) of the payload      |
//! | 16..24 | payload length, `u64`                   |
//! | 24..   | payload, exactly that many bytes        |
//!
//! A file is replaced by writing `<name>.tmp`, fsyncing it, renaming it over `<name>` and fsyncing
//! the directory, so after a crash a reader sees either the old or the new contents in full. A
//! leftover `.tmp` file is harmless: the next write truncates it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 8] = *b"RPMETA\0\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;

/// Why a metadata file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file exists but is not a valid version-1 metadata file. It is never guessed at: the
    /// operator has to look at it (restore from a peer or a backup).
    #[error("metadata file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> MetaError + '_ {
    move |source| MetaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces the file at `path` with `payload`, atomically and durably: when this returns Ok, a
/// crash at any later point leaves the new contents; a crash before leaves the old or the new.
pub fn write_atomic(path: &Path, payload: &[u8]) -> Result<(), MetaError> {
    let tmp = tmp_path(path);
    let bytes = encode(payload);

    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        // The data must be on disk before the rename makes it visible under the real name,
        // otherwise a crash could leave the real name pointing at an empty or partial file.
        file.sync_all()
    })();
    if let Err(source) = written {
        // Best effort: the tmp file is garbage either way and the next write truncates it.
        let _ = fs::remove_file(&tmp);
        return Err(MetaError::Io { path: tmp, source });
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    // The rename itself is only durable once the directory entry is.
    let dir = parent_dir(path);
    sync_dir(dir).map_err(io_err(dir))
}

fn encode(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A small file overwritten in place with one positioned write and no fsync: cheap enough to
/// write on every commit. It survives a process crash (the page cache keeps it) but not
/// necessarily a power loss, where a reader may find the old contents or a torn file that fails
/// its checksum. Only for hints that are safe to lose, such as the last known commit index.
/// Read back with [`read`].
pub struct HintFile {
    file: File,
    /// The file's length as of the last write: it is cut only when a write is shorter, so the
    /// usual write (same length or longer) is one system call.
    len: std::sync::atomic::AtomicU64,
}

impl HintFile {
    /// Opens (or creates, empty) the hint file at `path`.
    pub fn open(path: &Path) -> io::Result<HintFile> {
        let file = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(HintFile { file, len: len.into() })
    }

    /// Whether nothing was ever written to it.
    pub fn is_empty(&self) -> bool {
        self.len.load(std::sync::atomic::Ordering::Relaxed) == 0
    }

    /// Replaces the contents with `payload`. One writer at a time.
    pub fn overwrite(&self, payload: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let bytes = encode(payload);
        self.file.write_all_at(&bytes, 0)?;
        let new_len = bytes.len() as u64;
        if new_len < self.len.load(Ordering::Relaxed) {
            self.file.set_len(new_len)?;
        }
        self.len.store(new_len, Ordering::Relaxed);
        Ok(())
    }
}

/// Reads a file written by [`write_atomic`] or [`HintFile::overwrite`]. `Ok(None)` if it does not exist; `Err(Corrupt)` if it
/// exists but fails any check, never a payload that did not pass its checksum.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, MetaError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    decode(&bytes)
        .map(Some)
        .map_err(|reason| MetaError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })
}

fn decode(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "file is {} bytes, shorter than the {HEADER_LEN}-byte header (truncated?)",
            bytes.len()
        ));
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    if header[0..8] != MAGIC {
        return Err("bad magic: not a rampart metadata file".to_string());
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(format!(
            "unsupported format version {version} (this build reads version {VERSION})"
        ));
    }
    let stored_crc = u32::from_le_bytes(header[12..16].try_into().unwrap());
    let len = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if len != payload.len() as u64 {
        return Err(format!(
            "header says {len} payload bytes but the file holds {} (truncated or overwritten)",
            payload.len()
        ));
    }
    let crc = crc32c::crc32c(payload);
    if crc != stored_crc {
        return Err(format!(
            "payload checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x})"
        ));
    }
    Ok(payload.to_vec())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes creations, renames and removals of entries in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_corrupt(bytes: &[u8], reason_contains: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        fs::write(&path, bytes).unwrap();
        match read(&path) {
            Err(MetaError::Corrupt { path: p, reason }) => {
                assert_eq!(p, path);
                assert!(
                    reason.contains(reason_contains),
                    "reason {reason:?} should mention {reason_contains:?}"
                );
                let msg = read(&path).unwrap_err().to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    fn written(payload: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        write_atomic(&path, payload).unwrap();
        fs::read(&path).unwrap()
    }

    #[test]
    fn roundtrip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vote");
        write_atomic(&path, b"first").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"first"[..]));
        write_atomic(&path, b"").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b""[..]));
        write_atomic(&path, b"third, longer than before").unwrap();
        assert_eq!(
            read(&path).unwrap().as_deref(),
            Some(&b"third, longer than before"[..])
        );
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn hint_file_reads_back_each_overwrite_shorter_or_longer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hint");
        let hint = HintFile::open(&path).unwrap();
        assert!(hint.is_empty());
        for payload in [&b"a longer first hint"[..], b"short", b"short", b"", b"longer than the last one"] {
            hint.overwrite(payload).unwrap();
            assert_eq!(read(&path).unwrap().as_deref(), Some(payload));
        }
        // Reopened, it knows its length, so a shorter write still cuts the file.
        drop(hint);
        let hint = HintFile::open(&path).unwrap();
        assert!(!hint.is_empty());
        hint.overwrite(b"x").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn io_failure_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("m");
        match write_atomic(&path, b"x") {
            Err(e @ MetaError::Io { .. }) => {
                assert!(e.to_string().contains("no-such-dir"), "{e}")
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&dir.path().join("nope")).unwrap(), None);
    }

    #[test]
    fn stale_tmp_file_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        write_atomic(&path, b"good").unwrap();
        fs::write(tmp_path(&path), b"half-written garbage from a crash").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"good"[..]));
        write_atomic(&path, b"newer").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"newer"[..]));
    }

    #[test]
    fn flipped_payload_byte_is_corrupt() {
        let mut bytes = written(b"payload");
        *bytes.last_mut().unwrap() ^= 0x01;
        check_corrupt(&bytes, "checksum mismatch");
    }

    #[test]
    fn truncated_is_corrupt() {
        let bytes = written(b"payload");
        check_corrupt(&bytes[..bytes.len() - 1], "payload bytes");
        check_corrupt(&bytes[..10], "shorter than");
        check_corrupt(&[], "shorter than");
    }

    #[test]
    fn bad_magic_is_corrupt() {
        let mut bytes = written(b"payload");
        bytes[0] = b'X';
        check_corrupt(&bytes, "bad magic");
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut bytes = written(b"payload");
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        check_corrupt(&bytes, "unsupported format version 2");
    }

    /// Stored-format compatibility: a version-1 file built by hand from the documented layout,
    /// not by `write_atomic`, must keep parsing in every later version.
    #[test]
    fn reads_hand_built_version_1_file() {
        #[rustfmt::skip]
        let bytes: Vec<u8> = vec![
            b'R', b'P', b'M', b'E', b'T', b'A', 0, 0, // magic
            1, 0, 0, 0,                               // version 1
            0x83, 0x92, 0x06, 0xe3,                   // crc32c("123456789"), the standard check value
            9, 0, 0, 0, 0, 0, 0, 0,                   // payload length 9
            b'1', b'2', b'3', b'4', b'5', b'6', b'7', b'8', b'9',
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"123456789"[..]));
        // And the writer still produces exactly that layout.
        assert_eq!(written(b"123456789"), bytes);
    }
}
