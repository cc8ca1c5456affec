//! The raft log: an append-only sequence of `(index, payload)` records in checksummed segment
//! files. It knows nothing about raft; the raft layer encodes its entries into payloads.
//!
//! # Directory layout
//!
//! - `<first index, 20 digits>.seg`: segment files, so `ls` lists them in log order. Segments are
//!   contiguous: each one starts at the index after the last record of the one before.
//! - `purged.meta`: the purge point, written with [`crate::meta::write_atomic`]; its payload is
//!   one `u64` (little-endian). Records at or below it are gone even if a crash left their
//!   segment file behind.
//! - `LOCK`: held with an exclusive `flock` while a [`LogStore`] is open, so two processes (or two
//!   stores in one process) never write the same log.
//!
//! # Segment format (version 2, all integers little-endian)
//!
//! Header, 24 bytes:
//!
//! | bytes  | field                                              |
//! |--------|----------------------------------------------------|
//! | 0..8   | magic `b"RPLOGSEG"`                                |
//! | 8..12  | format version, `u32` = 2 (1 is still read)        |
//! | 12..20 | index of the first record, `u64` (matches the name)|
//! | 20..24 | crc32c of bytes 0..20                              |
//!
//! Then records back to back, each:
//!
//! | bytes  | field                                                        |
//! |--------|--------------------------------------------------------------|
//! | 0..4   | payload length `n`, `u32`                                    |
//! | 4..8   | crc32c of the index (8 bytes, little-endian) then the payload|
//! | 8..16  | index, `u64`                                                 |
//! | 16..   | payload, `n` bytes                                           |
//!
//! In version 2 the records of the *last* segment may be followed by a zero-filled tail: zeros
//! written ahead of the write position by the log's zeroing thread (`zeroer`, up to
//! [`rampart_core::limits::LOG_ZERO_AHEAD_BYTES`]), so that an append's `fdatasync` writes only
//! the records, not also new blocks, converted extents or a new file size. The tail starts where
//! a record header would, with 16 zero bytes (never a valid
//! record: its checksum would be 0, and crc32c of eight zero bytes is not). A segment is cut back
//! to its last record before the next one is created, so only the last segment has a tail.
//! Version 1 is the same without the tail: its records run to the end of the file. A version-1
//! segment left by an older build is read, and continued in version 1 until it is full.
//!
//! A new segment is started when the active one has reached `segment_bytes`, so a segment can
//! exceed it by one record.
//!
//! # Recovery
//!
//! [`LogStore::open`] reads every segment and verifies every checksum. Damage that a crash can
//! cause to data that was never synced, and therefore never acknowledged, is cut off with a
//! warning; everything else is refused with [`LogError::Corrupt`]. Only the end of the *last*
//! segment is ever cut, because a segment is synced before the next one is created. What counts
//! as crash damage there:
//!
//! - a record (or the segment header) cut short by the end of the file;
//! - a record failing its checksum that ends exactly at the end of the file, or (version 2) is
//!   followed only by zeros up to the end of the file;
//! - a record (or header) failing its checksum that overlaps a 512-byte-aligned sector that is
//!   all zeros: some filesystems extend a file before its data blocks reach the disk, so a crash
//!   leaves zeros where unsynced records were. etcd's WAL applies the same rule.
//!
//! The cut-off record and everything after it is discarded. A record is never skipped. The
//! zero-filled tail of a version-2 segment is a clean end, not damage; whatever follows it is
//! cut off as well (it can only be writes that never reached a sync), so that no stale bytes
//! remain ahead of the next append.
//!
//! # Writes
//!
//! [`LogStore::append`] encodes into an in-memory buffer that is written with one positioned
//! write when it reaches 1 MiB, at [`LogStore::sync`], or before a segment roll, so a batch of
//! appends followed by one sync costs one write and one `fdatasync`. Reads of records still in
//! the buffer are served from it. A segment is synced, with its directory entry, before the next
//! one is created.

mod format;
mod recover;
#[cfg(test)]
mod tests;
mod zeroer;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::meta::{self, MetaError};
use format::{
    encode_record, encode_segment_header, segment_file_name, verify_record, RECORD_HEADER_LEN,
};
use zeroer::Zeroer;

/// File holding the purge point.
const PURGE_FILE: &str = "purged.meta";
/// File locked while a store is open.
const LOCK_FILE: &str = "LOCK";
/// Appended bytes are written to the file once this many are buffered, so memory stays bounded
/// when the raft layer appends a large batch before syncing.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;
/// `read_range` reads neighbouring records with one `read_at` of up to this many bytes (or one
/// record, if larger), so catching up a follower is not one syscall per entry.
const READ_SPAN_BYTES: u64 = 1024 * 1024;

/// Tuning of a [`LogStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// A new segment file is started once the active one holds at least this many bytes.
    pub segment_bytes: u64,
    /// Zeros kept written ahead of the active segment's records by a thread of the log's own
    /// (see `zeroer`); 0 for none.
    pub zero_ahead_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: rampart_core::limits::LOG_SEGMENT_BYTES,
            zero_ahead_bytes: rampart_core::limits::LOG_ZERO_AHEAD_BYTES,
        }
    }
}

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log I/O error: {action} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        /// What was being done, e.g. "writing segment".
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// Stored data failed verification. It is never used; the member needs its log restored
    /// (for example by removing it and re-adding it, so that it gets a snapshot from the leader).
    #[error(
        "raft log is corrupt: {} at byte offset {offset}: {reason}; refusing to use it",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("raft log append out of order: expected index {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    /// The log is empty because everything up to `purged` was purged; the next record must come
    /// after that point, or a reopen would hide it behind the purge point.
    #[error(
        "raft log append of index {got} refused: records up to index {purged} were purged, \
         so the next index must be above it"
    )]
    BelowPurged { purged: u64, got: u64 },
    #[error("raft log record {index} has a {len}-byte payload; a record holds at most 4 GiB")]
    TooLarge { index: u64, len: usize },
    #[error(
        "raft log directory {} is already open (lock held by another process or another \
         LogStore in this one)",
        path.display()
    )]
    Locked { path: PathBuf },
    /// The purge point file could not be read or written.
    #[error("raft log purge point: {0}")]
    Meta(#[from] MetaError),
    /// An earlier write, sync or removal failed, so what is on disk is no longer known (after a
    /// failed fsync the kernel may have dropped the dirty pages). Only a reopen, which verifies
    /// everything on disk, makes the store usable again.
    #[error(
        "raft log is unusable after an earlier write failure ({reason}); restart the member so \
         that it recovers from what is on disk"
    )]
    Failed { reason: String },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io {
        path,
        action,
        source,
    }
}

/// Where a record lives inside its segment. Which segment is found from the segments' first
/// indexes, so this stays 16 bytes per record.
#[derive(Debug, Clone, Copy)]
struct Loc {
    /// Byte offset of the record header in the segment file.
    offset: u64,
    /// Payload length.
    len: u32,
}

impl Loc {
    fn end(self) -> u64 {
        self.offset + RECORD_HEADER_LEN + u64::from(self.len)
    }
}

/// The durable half of a sync, run without holding the log (see [`LogStore::begin_sync`]).
#[must_use = "a begun sync must be run and finished"]
pub struct PendingSync {
    /// The active segment (its own handle) and its path, if records were written.
    file: Option<(File, PathBuf)>,
    /// The log directory, if segments were created or removed.
    dir: Option<PathBuf>,
}

impl PendingSync {
    pub fn run(&self) -> Result<(), LogError> {
        if let Some((file, path)) = &self.file {
            file.sync_data().map_err(io_err(path, "syncing segment"))?;
        }
        if let Some(dir) = &self.dir {
            meta::sync_dir(dir).map_err(io_err(dir, "syncing directory"))?;
        }
        Ok(())
    }
}

struct Segment {
    /// Index of the first record in the file (also in its name and header). For the oldest
    /// segment it can be below the log's first index: purged records stay in the file until the
    /// whole file can go.
    first_index: u64,
    path: PathBuf,
    /// Opened read-write; all access is positioned (`read_at` / `write_all_at`).
    file: File,
    /// Bytes written to the file (synced or not). For the active segment, `LogStore::pending`
    /// continues from here.
    written_len: u64,
    /// The segment's format allows a zero-filled tail (version 2 on), so zeros are written ahead.
    preallocate: bool,
}

/// The raft log. See the module documentation for the format and recovery rules.
///
/// Invariants: every segment holds at least one record (visible or purged) and segments are
/// contiguous; the log is empty exactly when there are no segments; only the last (active)
/// segment can have data that is not yet synced.
pub struct LogStore {
    dir: PathBuf,
    opts: LogOptions,
    /// Writes zeros ahead of the active segment's records. Declared before `_lock`, so its thread
    /// has stopped before another store can open the directory.
    zeroer: Zeroer,
    /// Held for the lifetime of the store; dropping it releases the lock.
    _lock: File,
    /// Oldest first; the last one is the active segment.
    segments: Vec<Segment>,
    /// One entry per visible record, `locs[i]` is index `first + i`.
    locs: VecDeque<Loc>,
    /// Index of `locs[0]`; meaningless when `locs` is empty.
    first: u64,
    /// Records at or below this are purged; appends to an empty log must be above it.
    purged: Option<u64>,
    /// Encoded records of the active segment not yet written to its file.
    pending: Vec<u8>,
    /// The active segment has appended data not yet fdatasync'ed.
    needs_sync: bool,
    /// Segment files were created or removed since the directory was last fsynced.
    dir_dirty: bool,
    /// A [`PendingSync`] was handed out and not finished yet.
    sync_in_flight: bool,
    /// Set when a mutation failed part-way; every later call refuses (see `LogError::Failed`).
    failed: Option<String>,
    /// The zeroer works on the active segment (set on the segment's first write after it was
    /// created, opened or cut).
    zeroing: bool,
    /// Record bytes appended since the last sync began.
    unsynced_bytes: u64,
    /// Moving average of the record bytes one sync makes durable (weight 1/8 per sync).
    bytes_per_sync: u64,
}

impl fmt::Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.dir)
            .field("first_index", &self.first_index())
            .field("last_index", &self.last_index())
            .field("purged", &self.purged)
            .field("segments", &self.segments.len())
            .field("pending_bytes", &self.pending.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl LogStore {
    /// Opens (creating dir if needed) and recovers: scans every segment, verifies every record's
    /// checksum, rebuilds the in-memory index.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<LogStore, LogError> {
        recover::open(dir, opts)
    }

    pub fn first_index(&self) -> Option<u64> {
        (!self.locs.is_empty()).then_some(self.first)
    }

    pub fn last_index(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.first + self.locs.len() as u64 - 1)
    }

    /// Appends one record (buffered, not yet durable). `index` must be `last_index() + 1`, or any
    /// value above the purge point when the log is empty; otherwise `Err(Gap)` /
    /// `Err(BelowPurged)` and nothing changes.
    pub fn append(&mut self, index: u64, payload: &[u8]) -> Result<(), LogError> {
        self.check_usable()?;
        match self.last_index() {
            Some(last) if last.checked_add(1) != Some(index) => {
                return Err(LogError::Gap {
                    expected: last.saturating_add(1),
                    got: index,
                });
            }
            None => match self.purged {
                Some(purged) if index <= purged => {
                    return Err(LogError::BelowPurged { purged, got: index })
                }
                _ => {}
            },
            _ => {}
        }
        let Ok(len) = u32::try_from(payload.len()) else {
            return Err(LogError::TooLarge {
                index,
                len: payload.len(),
            });
        };
        self.poison_on_err(|log| log.append_checked(index, payload, len))
    }

    fn append_checked(&mut self, index: u64, payload: &[u8], len: u32) -> Result<(), LogError> {
        let active_full = self
            .segments
            .last()
            .is_none_or(|s| s.written_len + self.pending.len() as u64 >= self.opts.segment_bytes);
        if active_full {
            self.start_segment(index)?;
        }
        let active = self.segments.last().expect("a segment was just ensured");
        let offset = active.written_len + self.pending.len() as u64;
        encode_record(&mut self.pending, index, payload);
        if self.locs.is_empty() {
            self.first = index;
        }
        self.locs.push_back(Loc { offset, len });
        self.unsynced_bytes += RECORD_HEADER_LEN + u64::from(len);
        self.needs_sync = true;
        if self.pending.len() >= WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Creates the segment file whose first record will be `first_index`.
    fn start_segment(&mut self, first_index: u64) -> Result<(), LogError> {
        if !self.segments.is_empty() {
            // Make the finished segment, data and directory entry, durable before the next one
            // exists on disk. Recovery may then treat damage at the end of the last segment as a
            // torn write, because no earlier segment can be missing unsynced data. Its
            // zero-filled tail goes first: only the last segment may have one.
            if self.needs_sync {
                self.flush()?;
            }
            // Only the zeroer lengthens a file past its records (recovery cuts what it finds).
            let reach = self.stop_zeroing();
            let old = self.segments.last_mut().expect("checked above");
            if reach > old.written_len {
                old.file
                    .set_len(old.written_len)
                    .map_err(io_err(&old.path, "cutting the preallocated tail of segment"))?;
                old.file
                    .sync_all()
                    .map_err(io_err(&old.path, "syncing segment"))?;
                self.needs_sync = false;
            } else if self.needs_sync {
                old.file
                    .sync_data()
                    .map_err(io_err(&old.path, "syncing segment"))?;
                self.needs_sync = false;
            }
            self.sync_dir_if_dirty()?;
        }
        debug_assert!(self.pending.is_empty());
        let path = self.dir.join(segment_file_name(first_index));
        // create_new: a leftover file of that name would mean our picture of the directory is
        // wrong, and overwriting it could destroy records.
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path, "creating segment"))?;
        self.pending
            .extend_from_slice(&encode_segment_header(first_index));
        self.segments.push(Segment {
            first_index,
            path,
            file,
            written_len: 0,
            preallocate: true,
        });
        self.dir_dirty = true;
        Ok(())
    }

    /// Writes the buffered bytes to the active segment (not synced).
    fn flush(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let active = self
            .segments
            .last_mut()
            .expect("pending bytes belong to the active segment");
        let end = active.written_len + self.pending.len() as u64;
        if active.preallocate {
            if !self.zeroing {
                self.zeroer.retarget(Some((&active.path, active.written_len, self.opts.segment_bytes)));
                self.zeroing = true;
            }
            // Zeros pay off for small syncs, where a sync's fixed cost is most of it; under big
            // ones they would double the disk's write load for little gain.
            let wanted = self.bytes_per_sync <= rampart_core::limits::LOG_ZERO_AHEAD_MAX_SYNC_BYTES;
            self.zeroer.before_write(active.written_len, end, wanted);
        }
        active
            .file
            .write_all_at(&self.pending, active.written_len)
            .map_err(io_err(&active.path, "writing segment"))?;
        active.written_len = end;
        self.pending.clear();
        // One huge record should not pin a huge buffer for the life of the process.
        if self.pending.capacity() > 2 * WRITE_BUFFER_BYTES {
            self.pending.shrink_to(WRITE_BUFFER_BYTES);
        }
        Ok(())
    }

    /// Makes every appended record durable (fdatasync of the active segment; fsync of the
    /// directory when segments were created/removed since the last sync).
    pub fn sync(&mut self) -> Result<(), LogError> {
        if let Some(pending) = self.begin_sync()? {
            let result = pending.run();
            self.finish_sync(result)?;
        }
        Ok(())
    }

    /// The first half of [`LogStore::sync`], for a caller that holds this log behind a lock:
    /// writes the buffered records and returns what is left to make them durable, which
    /// [`PendingSync::run`] does without the log (so appends and reads go on meanwhile), and
    /// [`LogStore::finish_sync`] then records. None if nothing needs syncing.
    ///
    /// Every record appended before this call is durable once `run` succeeds. One sync at a
    /// time: a second `begin_sync` before `finish_sync` is a bug.
    pub fn begin_sync(&mut self) -> Result<Option<PendingSync>, LogError> {
        self.check_usable()?;
        assert!(!self.sync_in_flight, "one raft log sync at a time");
        self.poison_on_err(|log| {
            let file = if log.needs_sync {
                log.flush()?;
                match log.segments.last() {
                    Some(active) => Some((
                        active.file.try_clone().map_err(io_err(&active.path, "opening segment for sync"))?,
                        active.path.clone(),
                    )),
                    None => None,
                }
            } else {
                None
            };
            let dir = log.dir_dirty.then(|| log.dir.clone());
            if file.is_none() && dir.is_none() {
                return Ok(None);
            }
            let sample = std::mem::take(&mut log.unsynced_bytes);
            log.bytes_per_sync = log.bytes_per_sync - log.bytes_per_sync / 8 + sample / 8;
            // Cleared now: records appended while the sync runs set it again, for the next one.
            log.needs_sync = false;
            log.dir_dirty = false;
            log.sync_in_flight = true;
            Ok(Some(PendingSync { file, dir }))
        })
    }

    /// Records the outcome of [`PendingSync::run`]. A failed sync poisons the log: after a
    /// failed fsync the kernel may have dropped the dirty pages, so nothing written since the
    /// last good sync can be trusted (no retry, as PostgreSQL learned).
    pub fn finish_sync(&mut self, result: Result<(), LogError>) -> Result<(), LogError> {
        self.sync_in_flight = false;
        self.poison_on_err(|_| result)
    }

    fn sync_dir_if_dirty(&mut self) -> Result<(), LogError> {
        if self.dir_dirty {
            meta::sync_dir(&self.dir).map_err(io_err(&self.dir, "syncing directory"))?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    pub fn read(&self, index: u64) -> Result<Option<Vec<u8>>, LogError> {
        self.check_usable()?;
        let Some(loc) = self.loc(index) else {
            return Ok(None);
        };
        let seg = self.segment_of(index);
        let bytes = self.bytes(seg, loc.offset, loc.end())?;
        let payload = verify_record(&bytes, index, loc.len)
            .map_err(|reason| self.corrupt(seg, loc.offset, reason))?;
        Ok(Some(payload.to_vec()))
    }

    /// Records with start <= index < end that exist, in order.
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
        self.check_usable()?;
        let (Some(first), Some(last)) = (self.first_index(), self.last_index()) else {
            return Ok(Vec::new());
        };
        let lo = start.max(first);
        let hi = end.min(last.saturating_add(1));
        if lo >= hi {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity((hi - lo).min(1 << 16) as usize);
        let mut i = lo;
        while i < hi {
            let seg = self.segment_of(i);
            let seg_end = self
                .segments
                .get(seg + 1)
                .map_or(hi, |next| next.first_index.min(hi));
            let buffered = |loc: Loc| {
                seg + 1 == self.segments.len() && loc.offset >= self.segments[seg].written_len
            };
            // Grow a span of neighbouring records in this segment that all come from the file
            // or all from the write buffer, so it can be fetched in one piece.
            let first_loc = self.locs[self.pos(i)];
            let in_buffer = buffered(first_loc);
            let mut j = i + 1;
            let mut span_end = first_loc.end();
            while j < seg_end {
                let loc = self.locs[self.pos(j)];
                if buffered(loc) != in_buffer || loc.end() - first_loc.offset > READ_SPAN_BYTES {
                    break;
                }
                span_end = loc.end();
                j += 1;
            }
            let bytes = self.bytes(seg, first_loc.offset, span_end)?;
            for index in i..j {
                let loc = self.locs[self.pos(index)];
                let rel = (loc.offset - first_loc.offset) as usize;
                let record = &bytes[rel..rel + (loc.end() - loc.offset) as usize];
                let payload = verify_record(record, index, loc.len)
                    .map_err(|reason| self.corrupt(seg, loc.offset, reason))?;
                out.push((index, payload.to_vec()));
            }
            i = j;
        }
        Ok(out)
    }

    /// Removes every record with index >= `index`; durable when it returns.
    pub fn truncate_from(&mut self, index: u64) -> Result<(), LogError> {
        self.check_usable()?;
        match self.last_index() {
            Some(last) if index <= last => {}
            _ => return Ok(()),
        }
        self.poison_on_err(|log| log.truncate_checked(index))
    }

    fn truncate_checked(&mut self, index: u64) -> Result<(), LogError> {
        if index <= self.first {
            self.remove_segments_from(0)?;
            self.locs.clear();
            return Ok(());
        }
        let seg = self.segment_of(index);
        let loc = self.locs[self.pos(index)];
        if self.segments[seg].first_index == index {
            // `index` > first, so an older segment remains to become the active one.
            debug_assert!(seg > 0);
            self.remove_segments_from(seg)?;
        } else {
            self.remove_segments_from(seg + 1)?;
            let written_len = self.segments.last().expect("segment `seg` remains").written_len;
            if loc.offset >= written_len {
                // Only buffered bytes are affected; nothing on disk changes.
                self.pending.truncate((loc.offset - written_len) as usize);
            } else {
                self.pending.clear();
                self.stop_zeroing();
                let active = self.segments.last_mut().expect("segment `seg` remains");
                active
                    .file
                    .set_len(loc.offset)
                    .map_err(io_err(&active.path, "truncating segment"))?;
                // sync_all, not sync_data: the new length is what makes the cut durable.
                active
                    .file
                    .sync_all()
                    .map_err(io_err(&active.path, "syncing truncated segment"))?;
                active.written_len = loc.offset;
            }
        }
        let keep = self.pos(index);
        self.locs.truncate(keep);
        Ok(())
    }

    /// Deletes segments `from..`, newest first, syncing the directory after each removal. That
    /// way a crash part-way leaves a shorter log, never one with a hole in the middle (which
    /// recovery would rightly call corrupt).
    fn remove_segments_from(&mut self, from: usize) -> Result<(), LogError> {
        if self.segments.len() > from {
            self.stop_zeroing();
        }
        while self.segments.len() > from {
            let seg = self.segments.pop().expect("len > from");
            // The buffer belongs to the active segment, which is the first one removed; every
            // older segment was fully written and synced when its successor was created.
            self.pending.clear();
            self.needs_sync = false;
            fs::remove_file(&seg.path).map_err(io_err(&seg.path, "removing segment"))?;
            self.dir_dirty = true;
            self.sync_dir_if_dirty()?;
        }
        Ok(())
    }

    /// Records with index <= `index` are no longer needed. They disappear from the log at once
    /// (`first_index()` becomes `index + 1`, or the log becomes empty if `index >=
    /// last_index()`), and whole segment files holding only such records are deleted. Durable
    /// when it returns: the purge point is stored first, so a reopen hides purged records even
    /// if a crash left their files behind.
    pub fn purge_to(&mut self, index: u64) -> Result<(), LogError> {
        self.check_usable()?;
        if self.purged.is_some_and(|p| index <= p) {
            return Ok(());
        }
        self.poison_on_err(|log| log.purge_checked(index))
    }

    fn purge_checked(&mut self, index: u64) -> Result<(), LogError> {
        meta::write_atomic(&self.dir.join(PURGE_FILE), &index.to_le_bytes())?;
        self.purged = Some(index);
        let Some(last) = self.last_index() else {
            return Ok(());
        };
        if index < self.first {
            return Ok(());
        }
        // Segment k can go when its successor starts at or below index + 1. With everything
        // purged, all of them go, and the next append starts a fresh segment at its own index.
        let removable = if index >= last {
            self.locs.clear();
            self.segments.len()
        } else {
            let gone = self.pos(index) + 1;
            self.locs.drain(..gone);
            self.first = index + 1;
            self.segments
                .partition_point(|s| s.first_index <= index + 1)
                .saturating_sub(1)
        };
        if removable == self.segments.len() {
            self.stop_zeroing();
            self.pending.clear();
            self.needs_sync = false;
        }
        // Oldest first, and no directory sync per file: a file that comes back after a crash is
        // below the stored purge point, and recovery deletes it again.
        for seg in self.segments.drain(..removable) {
            fs::remove_file(&seg.path).map_err(io_err(&seg.path, "removing purged segment"))?;
            self.dir_dirty = true;
        }
        Ok(())
    }

    /// Stops the zeroer's work on the active segment before it is cut or removed, waiting for
    /// the piece it is writing; returns how far the file reaches now (0 if it was not zeroing).
    fn stop_zeroing(&mut self) -> u64 {
        if !std::mem::take(&mut self.zeroing) {
            return 0;
        }
        self.zeroer.retarget(None)
    }

    /// Waits until the zeroer has caught up (tests that look at the zero-filled tail).
    #[cfg(test)]
    fn settle_zeros(&self) {
        self.zeroer.settle();
    }

    /// Total bytes of segment files, for metrics.
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.written_len).sum::<u64>() + self.pending.len() as u64
    }

    fn check_usable(&self) -> Result<(), LogError> {
        match &self.failed {
            Some(reason) => Err(LogError::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Runs a mutation that has passed its argument checks; if it fails, the in-memory state
    /// and the files may disagree, so the store refuses all further calls.
    fn poison_on_err<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let result = f(self);
        if let Err(e) = &result {
            tracing::error!(dir = %self.dir.display(), error = %e, "raft log write failed; refusing further use until restart");
            self.failed = Some(e.to_string());
        }
        result
    }

    /// Position of `index` in `locs`; the caller knows it is in range.
    fn pos(&self, index: u64) -> usize {
        (index - self.first) as usize
    }

    fn loc(&self, index: u64) -> Option<Loc> {
        let pos = index.checked_sub(self.first)?;
        if self.locs.is_empty() {
            return None;
        }
        self.locs.get(usize::try_from(pos).ok()?).copied()
    }

    /// The segment holding `index`, which must be in the log.
    fn segment_of(&self, index: u64) -> usize {
        self.segments.partition_point(|s| s.first_index <= index) - 1
    }

    /// Bytes `start..end` of segment `seg`, from the write buffer or with one positioned read.
    /// A range never straddles the two, because the buffer is always written out whole.
    fn bytes(&self, seg: usize, start: u64, end: u64) -> Result<Cow<'_, [u8]>, LogError> {
        let s = &self.segments[seg];
        if seg + 1 == self.segments.len() && start >= s.written_len {
            let from = (start - s.written_len) as usize;
            let to = (end - s.written_len) as usize;
            return Ok(Cow::Borrowed(&self.pending[from..to]));
        }
        assert!(end <= s.written_len, "a read straddles the write buffer");
        let mut buf = vec![0u8; (end - start) as usize];
        s.file
            .read_exact_at(&mut buf, start)
            .map_err(io_err(&s.path, "reading segment"))?;
        Ok(Cow::Owned(buf))
    }

    fn corrupt(&self, seg: usize, offset: u64, reason: String) -> LogError {
        LogError::Corrupt {
            path: self.segments[seg].path.clone(),
            offset,
            reason,
        }
    }
}
