//! Opening a log directory: lock it, read the purge point, scan and verify every segment, cut off
//! a torn tail, and rebuild the in-memory index. The rules are in the parent module's docs.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    decode_record_header, decode_segment_header, parse_segment_file_name, record_checksum,
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SEGMENT_SUFFIX, ZERO_TAIL_VERSION,
};
use super::zeroer::Zeroer;
use super::{io_err, Loc, LogError, LogOptions, LogStore, Segment, LOCK_FILE, PURGE_FILE};
use crate::meta;

/// Read buffer of the recovery scan; memory stays bounded whatever the segment size.
const SCAN_BUFFER_BYTES: usize = 1024 * 1024;
/// Granularity of the zero-filled-tail check: the smallest block a disk writes.
const SECTOR_BYTES: u64 = 512;

pub(super) fn open(dir: &Path, opts: LogOptions) -> Result<LogStore, LogError> {
    create_dir_durably(dir)?;
    let lock = lock_dir(dir)?;
    let purged = read_purge_point(dir)?;

    let mut names = list_segments(dir)?;
    let mut removed_any = false;
    if let Some(p) = purged {
        // A segment whose successor starts at or below p + 1 holds only purged records. Such
        // files are left behind when a crash interrupts purge_to, in any order, so drop them by
        // name before checking that the segments are contiguous.
        while names.len() >= 2 && names[1].0 <= p.saturating_add(1) {
            let (_, path) = names.remove(0);
            tracing::info!(path = %path.display(), purged = p, "raft log: removing segment left behind by an interrupted purge");
            fs::remove_file(&path).map_err(io_err(&path, "removing purged segment"))?;
            removed_any = true;
        }
    }

    let mut segments: Vec<Segment> = Vec::with_capacity(names.len());
    let mut locs: VecDeque<Loc> = VecDeque::new();
    let mut first = 0;
    let mut prev_last: Option<u64> = None;
    let count = names.len();
    for (i, (name_first, path)) in names.into_iter().enumerate() {
        let is_last = i + 1 == count;
        let was_empty = locs.is_empty();
        match scan_segment(&path, name_first, is_last, prev_last, &mut locs)? {
            Scanned::Kept(segment, last) => {
                if was_empty {
                    first = segment.first_index;
                }
                prev_last = Some(last);
                segments.push(segment);
            }
            Scanned::Removed => {
                fs::remove_file(&path).map_err(io_err(&path, "removing empty segment"))?;
                removed_any = true;
            }
        }
    }

    if let Some(p) = purged {
        if !locs.is_empty() && p >= first {
            let hidden = (p - first + 1).min(locs.len() as u64);
            locs.drain(..hidden as usize);
            if !locs.is_empty() {
                first = p + 1;
            }
        }
        if locs.is_empty() {
            // Everything left is purged (or there was nothing): the log is empty, and an empty
            // log has no segments, so the next append starts a fresh one at its own index.
            for seg in segments.drain(..) {
                fs::remove_file(&seg.path).map_err(io_err(&seg.path, "removing purged segment"))?;
                removed_any = true;
            }
        }
    }

    // What the previous process wrote may still be only in the page cache (it crashed, the
    // kernel did not). Sync it now, so nothing this store reports as present can vanish later.
    for seg in &segments {
        seg.file
            .sync_data()
            .map_err(io_err(&seg.path, "syncing segment"))?;
    }
    meta::sync_dir(dir).map_err(io_err(dir, "syncing directory"))?;

    tracing::debug!(
        dir = %dir.display(),
        segments = segments.len(),
        records = locs.len(),
        removed_any,
        "raft log opened"
    );
    Ok(LogStore {
        dir: dir.to_path_buf(),
        opts,
        _lock: lock,
        segments,
        locs,
        first,
        purged,
        pending: Vec::new(),
        needs_sync: false,
        dir_dirty: false,
        sync_in_flight: false,
        failed: None,
        zeroer: Zeroer::start(opts.zero_ahead_bytes).map_err(io_err(dir, "starting the thread that writes zeros ahead in"))?,
        zeroing: false,
        unsynced_bytes: 0,
        bytes_per_sync: 0,
    })
}

/// Creates `dir` and any missing parents, syncing each new entry's parent directory so the
/// directories themselves survive a crash.
fn create_dir_durably(dir: &Path) -> Result<(), LogError> {
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.exists() {
        missing.push(p);
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io_err(dir, "creating log directory"))?;
    for created in missing.iter().rev() {
        let parent = match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        meta::sync_dir(parent).map_err(io_err(parent, "syncing directory"))?;
    }
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "opening lock file"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(LogError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&path, "locking")(e)),
    }
}

fn read_purge_point(dir: &Path) -> Result<Option<u64>, LogError> {
    let path = dir.join(PURGE_FILE);
    let Some(payload) = meta::read(&path)? else {
        return Ok(None);
    };
    let bytes: [u8; 8] = payload
        .as_slice()
        .try_into()
        .map_err(|_| LogError::Corrupt {
            path: path.clone(),
            offset: 0,
            reason: format!(
                "purge point payload is {} bytes, expected an 8-byte index",
                payload.len()
            ),
        })?;
    Ok(Some(u64::from_le_bytes(bytes)))
}

/// Segment files sorted by the first index in their names.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "listing log directory"))? {
        let entry = entry.map_err(io_err(dir, "listing log directory"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.ends_with(SEGMENT_SUFFIX)) else {
            continue;
        };
        let path = entry.path();
        let Some(first) = parse_segment_file_name(name) else {
            return Err(LogError::Corrupt {
                path,
                offset: 0,
                reason: "unexpected segment file name (want 20 digits then .seg)".to_string(),
            });
        };
        names.push((first, path));
    }
    names.sort_unstable_by_key(|(first, _)| *first);
    Ok(names)
}

enum Scanned {
    /// The segment and the index of its last record.
    Kept(Segment, u64),
    /// The segment holds no records (its creation was torn by a crash); the caller deletes it.
    Removed,
}

/// Verifies one segment and appends its records to `locs`. Cuts a torn tail off the last
/// segment; refuses anything else that fails a check.
fn scan_segment(
    path: &Path,
    name_first: u64,
    is_last: bool,
    prev_last: Option<u64>,
    locs: &mut VecDeque<Loc>,
) -> Result<Scanned, LogError> {
    let corrupt = |offset: u64, reason: String| LogError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path, "opening segment"))?;
    let file_len = file
        .metadata()
        .map_err(io_err(path, "reading segment metadata"))?
        .len();
    let read_err = io_err(path, "reading segment");

    if file_len < SEGMENT_HEADER_LEN {
        let reason = format!("file is {file_len} bytes, shorter than the segment header");
        if is_last {
            warn_torn(path, 0, file_len, &reason);
            return Ok(Scanned::Removed);
        }
        return Err(corrupt(0, reason));
    }
    let mut reader = BufReader::with_capacity(SCAN_BUFFER_BYTES, &file);
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    reader.read_exact(&mut header).map_err(read_err)?;
    let (seg_first, version) = match decode_segment_header(&header) {
        Ok(decoded) => decoded,
        Err(reason) => {
            if is_last
                && overlaps_zero_sector(&file, 0, SEGMENT_HEADER_LEN, file_len)
                    .map_err(io_err(path, "reading segment"))?
            {
                warn_torn(path, 0, file_len, &reason);
                return Ok(Scanned::Removed);
            }
            return Err(corrupt(0, reason));
        }
    };
    if seg_first != name_first {
        return Err(corrupt(
            0,
            format!(
                "header says the first index is {seg_first} but the file name says {name_first}"
            ),
        ));
    }
    if let Some(prev) = prev_last {
        if prev.checked_add(1) != Some(seg_first) {
            return Err(corrupt(
                0,
                format!(
                    "segment starts at index {seg_first} but the previous segment ends at index \
                     {prev}: records are missing or duplicated"
                ),
            ));
        }
    }

    let zero_tail_allowed = version >= ZERO_TAIL_VERSION;
    let mut offset = SEGMENT_HEADER_LEN;
    let mut next = seg_first;
    let mut records = 0u64;
    let mut payload = Vec::new();
    let end: ScanEnd = loop {
        if offset == file_len {
            break ScanEnd::FileEnd;
        }
        let remaining = file_len - offset;
        let mut rh = [0u8; RECORD_HEADER_LEN as usize];
        let have = remaining.min(RECORD_HEADER_LEN) as usize;
        reader
            .read_exact(&mut rh[..have])
            .map_err(io_err(path, "reading segment"))?;
        if zero_tail_allowed && rh[..have].iter().all(|&b| b == 0) {
            break ScanEnd::ZeroTail;
        }
        if remaining < RECORD_HEADER_LEN {
            break ScanEnd::Torn(format!(
                "incomplete record header ({remaining} of {RECORD_HEADER_LEN} bytes)"
            ));
        }
        let rec = decode_record_header(&rh);
        let rec_len = RECORD_HEADER_LEN + u64::from(rec.len);
        if remaining < rec_len {
            // Checked before allocating, so a damaged length cannot make us allocate 4 GiB.
            break ScanEnd::Torn(format!(
                "incomplete record: its header announces {} payload bytes but only {} follow",
                rec.len,
                remaining - RECORD_HEADER_LEN
            ));
        }
        payload.resize(rec.len as usize, 0);
        reader
            .read_exact(&mut payload)
            .map_err(io_err(path, "reading segment"))?;
        let computed = record_checksum(rec.index, &payload);
        if computed != rec.crc {
            let reason = format!(
                "record checksum mismatch (expected index {next}; header says index {}, {} \
                 payload bytes, stored crc {:#010x}, computed {computed:#010x})",
                rec.index, rec.len, rec.crc
            );
            let torn = is_last
                && (offset + rec_len == file_len
                    || overlaps_zero_sector(&file, offset, offset + rec_len, file_len)
                        .map_err(io_err(path, "reading segment"))?
                    || (zero_tail_allowed
                        && zeros_to_end(&file, offset + rec_len, file_len)
                            .map_err(io_err(path, "reading segment"))?));
            if torn {
                break ScanEnd::Torn(reason);
            }
            return Err(corrupt(offset, reason));
        }
        if rec.index != next {
            return Err(corrupt(
                offset,
                format!(
                    "record has index {} but index {next} was expected: the log has a gap or a \
                     duplicate",
                    rec.index
                ),
            ));
        }
        locs.push_back(Loc {
            offset,
            len: rec.len,
        });
        records += 1;
        next += 1;
        offset += rec_len;
    };

    let cut = match end {
        ScanEnd::FileEnd => false,
        ScanEnd::ZeroTail if !is_last => {
            return Err(corrupt(
                offset,
                "zero-filled space after the records of a segment that is not the last one (a \
                 segment is cut back to its records before the next one is created)"
                    .to_string(),
            ))
        }
        ScanEnd::ZeroTail => {
            // A clean end. Anything but zeros after it was written and never synced (or the
            // zeros hide damage, which the rule for zeroed sectors accepts as well); it goes, so
            // that no stale record can turn up behind the next append.
            if !zeros_to_end(&file, offset, file_len).map_err(io_err(path, "reading segment"))? {
                warn_torn(
                    path,
                    offset,
                    file_len - offset,
                    "non-zero bytes after the zero-filled end of the records",
                );
            }
            true
        }
        ScanEnd::Torn(reason) => {
            if !is_last {
                return Err(corrupt(offset, reason));
            }
            warn_torn(path, offset, file_len - offset, &reason);
            true
        }
    };
    if cut {
        // The preallocated space goes too; the next append allocates afresh (zeros).
        file.set_len(offset)
            .map_err(io_err(path, "truncating torn tail"))?;
        file.sync_all()
            .map_err(io_err(path, "syncing truncated segment"))?;
    }
    if records == 0 {
        if is_last {
            tracing::info!(path = %path.display(), "raft log: removing last segment, it holds no records");
            return Ok(Scanned::Removed);
        }
        return Err(corrupt(
            SEGMENT_HEADER_LEN,
            "segment holds no records but is not the last segment".to_string(),
        ));
    }
    Ok(Scanned::Kept(
        Segment {
            first_index: seg_first,
            path: path.to_path_buf(),
            file,
            written_len: offset,
            preallocate: zero_tail_allowed,
        },
        next - 1,
    ))
}

/// How the scan of a segment's records ended.
enum ScanEnd {
    /// The last record ends at the end of the file.
    FileEnd,
    /// A zero-filled tail (version 2) follows the last record.
    ZeroTail,
    /// Crash damage if this is the last segment, corruption otherwise; the reason says which
    /// check failed.
    Torn(String),
}

fn warn_torn(path: &Path, offset: u64, discarded_bytes: u64, reason: &str) {
    tracing::warn!(
        path = %path.display(),
        offset,
        discarded_bytes,
        reason,
        "raft log: discarding a torn write at the end of the last segment (written but not \
         synced before a crash, so never acknowledged)"
    );
}

/// Whether every byte from `start` to the end of the file is zero.
fn zeros_to_end(file: &File, start: u64, file_len: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; SCAN_BUFFER_BYTES.min((file_len - start) as usize)];
    let mut at = start;
    while at < file_len {
        let len = buf.len().min((file_len - at) as usize);
        file.read_exact_at(&mut buf[..len], at)?;
        if buf[..len].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += len as u64;
    }
    Ok(true)
}

/// Whether the bytes `start..end` overlap a sector-aligned block that is all zeros in the file
/// (the block is clipped at the end of the file). Only blocks starting at or after `start` count:
/// a zeroed block starting earlier would have damaged the previous record, which is checked
/// first.
fn overlaps_zero_sector(file: &File, start: u64, end: u64, file_len: u64) -> io::Result<bool> {
    let mut sector = start.next_multiple_of(SECTOR_BYTES);
    let mut buf = [0u8; SECTOR_BYTES as usize];
    while sector < end {
        let len = SECTOR_BYTES.min(file_len - sector) as usize;
        file.read_exact_at(&mut buf[..len], sector)?;
        if buf[..len].iter().all(|&b| b == 0) {
            return Ok(true);
        }
        sector += SECTOR_BYTES;
    }
    Ok(false)
}
