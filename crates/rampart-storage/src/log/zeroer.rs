//! Zeros written ahead of the active segment's records, by a thread of their own.
//!
//! Why: on ext4 an `fdatasync` of records written over zeros that are already on disk costs
//! ~150 µs of wall time here, against ~200 into `fallocate`d space (its extents are "unwritten",
//! and the first write into each block converts it) and ~260 at the end of the file (a new size
//! and new blocks each time). Written zeros make the sync write the records and nothing else
//! (findings 31 and 33 in docs/performance.md). Writing them from the appender, as cd5f597 did,
//! put 4 MiB of zeros into one foreground sync every 4 MiB of log, under the log's lock.
//!
//! How: one thread per open log keeps up to [`super::LogOptions::zero_ahead_bytes`] of zeros written
//! past the end of the active segment's records, in pieces of [`PIECE_BYTES`], each written back
//! to disk at once (`sync_file_range`), with an `fdatasync` of its own every [`SYNC_EVERY_BYTES`]
//! so the new extents' metadata is on disk before the records arrive. The zeros are the
//! segment's zero-filled tail, which the format allows (version 2); a crash that loses some of
//! them leaves a shorter file or a hole, which reads as zeros too.
//!
//! Invariant: the zeroer never writes below the end of what the appender has written or is
//! about to write. Before each write the appender calls [`Zeroer::before_write`], which records
//! the write's end and, should the piece being zeroed overlap the write, waits for that piece.
//! The zeroer starts its pieces at least a quarter of the zeros ahead (1 MiB by default, the
//! size of the log's write buffer) past that end, so the wait only happens for a single write
//! larger than that; if the zeroer falls behind, the records in between go where no zeros were
//! written, as they would without it. The log calls [`Zeroer::retarget`] before it cuts,
//! truncates or removes the active segment, which waits for the piece in flight, so zeros never
//! land in a file after it was cut.
//!
//! The zeroer opens the segment itself: its own open file description, so an I/O error its own
//! `fdatasync` consumes is still reported to the log's sync of the same file (Linux reports a
//! writeback error once per open file description).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Most zeros written per `pwrite`. The write holds the file's inode lock, which the appender's
/// own writes wait for, so it is kept short (~20-40 µs here).
const PIECE_BYTES: u64 = 64 * 1024;
/// Zeros written between two `fdatasync`s of the zeroer.
const SYNC_EVERY_BYTES: u64 = 1024 * 1024;

static ZEROS: [u8; PIECE_BYTES as usize] = [0; PIECE_BYTES as usize];

/// The segment the zeroer works ahead in.
struct Target {
    path: PathBuf,
    /// Opened by the zeroer on its first piece.
    file: Option<Arc<File>>,
    /// End of everything the appender has written or announced.
    written_to: u64,
    /// The file reaches this far: records, then zeros (or holes).
    zeroed_to: u64,
    /// No zeros at or beyond this offset (the segment's size limit).
    limit: u64,
    /// Zeros written since the zeroer's last `fdatasync`.
    unsynced: u64,
    /// The log wants zeros written ahead (its syncs are small).
    wanted: bool,
}

struct State {
    target: Option<Target>,
    /// Counts retargets, so a piece finished after one is not credited to the new target.
    generation: u64,
    /// The piece being written, `[start, end)`, and the generation it belongs to.
    busy: Option<(u64, u64, u64)>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the zeroer has work (to the zeroer) or a piece finished (to the appender).
    changed: Condvar,
    /// Zeros kept ahead of the records.
    ahead: u64,
    /// Pieces start at least this far past the records.
    gap: u64,
    /// Zeros per piece.
    piece: u64,
}

/// The zeroing thread of one log. Dropping it stops the thread after its current piece.
pub(super) struct Zeroer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Zeroer {
    /// Starts the thread; `ahead` bytes of zeros are kept past the records (0: no thread, and
    /// every call is a no-op).
    pub(super) fn start(ahead: u64) -> io::Result<Zeroer> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                target: None,
                generation: 0,
                busy: None,
                stop: false,
            }),
            changed: Condvar::new(),
            ahead,
            gap: ahead / 4,
            piece: (ahead / 8).clamp(1, PIECE_BYTES),
        });
        let thread = if ahead == 0 {
            None
        } else {
            let worker = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("rampart-log-zero".into())
                    .spawn(move || worker.run())?,
            )
        };
        Ok(Zeroer { shared, thread })
    }

    /// Stops zeroing in the current target (waiting for a piece in flight) and starts on `new`:
    /// a segment whose file reaches exactly `written_to` bytes and may get zeros up to `limit`.
    /// Returns how far the old target's file reaches (0 if there was none), so the caller can
    /// cut its tail.
    pub(super) fn retarget(&self, new: Option<(&Path, u64, u64)>) -> u64 {
        let mut st = self.lock();
        while st.busy.is_some() {
            st = self.wait(st);
        }
        st.generation += 1;
        let old = st
            .target
            .take()
            .map_or(0, |t| t.zeroed_to.max(t.written_to));
        if self.thread.is_some() {
            st.target = new.map(|(path, written_to, limit)| Target {
                path: path.to_path_buf(),
                file: None,
                written_to,
                zeroed_to: written_to,
                limit,
                unsynced: 0,
                wanted: true,
            });
            self.shared.changed.notify_all();
        }
        old
    }

    /// The appender is about to write `[start, end)` of the target segment; `wanted`: whether
    /// more zeros should be written ahead (zeros already written stay).
    pub(super) fn before_write(&self, start: u64, end: u64, wanted: bool) {
        if self.thread.is_none() {
            return;
        }
        let mut st = self.lock();
        while st.busy.is_some_and(|(s, e, _)| s < end && start < e) {
            st = self.wait(st);
        }
        let Some(t) = st.target.as_mut() else {
            return;
        };
        t.written_to = t.written_to.max(end);
        t.wanted = wanted;
        if wanted && t.zeroed_to < t.written_to + self.shared.ahead / 2 && st.busy.is_none() {
            self.shared.changed.notify_all();
        }
    }

    /// Waits until the zeroer has nothing left to do for now (tests).
    #[cfg(test)]
    pub(super) fn settle(&self) {
        let mut st = self.lock();
        while st.busy.is_some()
            || st
                .target
                .as_ref()
                .is_some_and(|t| self.shared.next_piece(t).is_some())
        {
            // Between half and all of the zeros ahead the appender does not wake the zeroer.
            self.shared.changed.notify_all();
            st = self
                .shared
                .changed
                .wait_timeout(st, std::time::Duration::from_millis(10))
                .unwrap()
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.shared
            .changed
            .wait(st)
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Zeroer {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// The next piece to zero in `t`, if its zeros reach less than `ahead` past the records.
    fn next_piece(&self, t: &Target) -> Option<(u64, u64)> {
        // A small segment (in tests) gets a small gap, so it still gets a tail.
        let start = t.zeroed_to.max(t.written_to + self.gap.min(t.limit / 4));
        let end = (start + self.piece).min(t.limit);
        (t.wanted && t.zeroed_to < t.written_to + self.ahead && start < end).then_some((start, end))
    }

    fn run(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.stop {
                return;
            }
            let generation = st.generation;
            let Some((start, end, file, sync)) = st.target.as_mut().and_then(|t| {
                let (start, end) = self.next_piece(t)?;
                let file = match &t.file {
                    Some(f) => f.clone(),
                    None => match File::options().write(true).open(&t.path) {
                        Ok(f) => t.file.insert(Arc::new(f)).clone(),
                        Err(err) => {
                            tracing::debug!(path = %t.path.display(), error = %err, "raft log: cannot open segment to write zeros ahead");
                            t.limit = 0;
                            return None;
                        }
                    },
                };
                let sync = t.unsynced + (end - start) >= SYNC_EVERY_BYTES;
                Some((start, end, file, sync))
            }) else {
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            st.busy = Some((start, end, generation));
            drop(st);

            let result = file.write_all_at(&ZEROS[..(end - start) as usize], start);

            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.busy = None;
            self.changed.notify_all();
            if st.generation != generation {
                continue;
            }
            let Some(t) = st.target.as_mut() else {
                continue;
            };
            match result {
                Ok(()) => {
                    t.zeroed_to = end;
                    t.unsynced = if sync { 0 } else { t.unsynced + (end - start) };
                }
                Err(err) => {
                    // The disk is full, most likely. Records then go where there are no zeros,
                    // as they would without the zeroer; what was written is a tail like any other.
                    tracing::debug!(path = %t.path.display(), error = %err, "raft log: could not write zeros ahead");
                    t.zeroed_to = t.zeroed_to.max(file.metadata().map_or(0, |m| m.len()));
                    t.limit = 0;
                    continue;
                }
            }
            drop(st);
            // Outside the lock: the appender goes on writing records meanwhile.
            write_back(&file, start, end - start);
            if sync {
                if let Err(err) = file.sync_data() {
                    tracing::debug!(error = %err, "raft log: could not sync zeros written ahead");
                }
            }
            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Writes the piece's pages to disk and waits for them, without flushing the device's cache,
/// so the log's next `fdatasync` does not have to.
fn write_back(file: &File, start: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(nbytes)) = (libc::off64_t::try_from(start), libc::off64_t::try_from(len))
    else {
        return;
    };
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, nbytes, flags) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "raft log: sync_file_range of zeros failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1024 * 1024;

    fn target(written_to: u64, zeroed_to: u64) -> Target {
        Target {
            path: PathBuf::from("/nonexistent"),
            file: None,
            written_to,
            zeroed_to,
            limit: 64 * MIB,
            unsynced: 0,
            wanted: true,
        }
    }

    #[test]
    fn pieces_start_past_the_records_and_stop_ahead_of_them() {
        let z = Zeroer::start(4 * MIB).unwrap();
        let s = &z.shared;
        // Fallen behind: the records went past the zeros.
        let (start, end) = s.next_piece(&target(10 * MIB, MIB)).unwrap();
        assert_eq!(start, 11 * MIB, "a gap of a quarter of the zeros ahead");
        assert_eq!(end - start, PIECE_BYTES);
        // Ahead, but less than 4 MiB: go on where the zeros end.
        assert_eq!(
            s.next_piece(&target(MIB, 3 * MIB)),
            Some((3 * MIB, 3 * MIB + PIECE_BYTES))
        );
        // 4 MiB ahead: nothing to do.
        assert_eq!(s.next_piece(&target(MIB, 5 * MIB)), None);
        // Never past the segment's limit.
        let mut t = target(62 * MIB, 64 * MIB - 10);
        assert_eq!(s.next_piece(&t), Some((64 * MIB - 10, 64 * MIB)));
        t.zeroed_to = 64 * MIB;
        assert_eq!(s.next_piece(&t), None);
        // Not while the log's syncs are big.
        let mut t = target(MIB, 3 * MIB);
        t.wanted = false;
        assert_eq!(s.next_piece(&t), None);
    }

    #[test]
    fn a_write_over_the_piece_being_zeroed_waits_for_it() {
        let z = Arc::new(Zeroer::start(4 * MIB).unwrap());
        {
            let mut st = z.lock();
            st.target = Some(target(0, 0));
            st.target.as_mut().unwrap().limit = 0; // the thread has nothing to do
            st.busy = Some((MIB, MIB + PIECE_BYTES, st.generation));
        }
        // A write below the piece goes ahead at once.
        z.before_write(0, MIB, true);
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let z = z.clone();
            std::thread::spawn(move || {
                z.before_write(MIB, MIB + 10, true);
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "waits while the piece is written"
        );
        z.lock().busy = None;
        z.shared.changed.notify_all();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("goes ahead once the piece is done");
        writer.join().unwrap();
        assert_eq!(z.lock().target.as_ref().unwrap().written_to, MIB + 10);
    }

    #[test]
    fn retarget_waits_for_the_piece_in_flight() {
        let z = Arc::new(Zeroer::start(4 * MIB).unwrap());
        {
            let mut st = z.lock();
            let mut t = target(0, 2 * MIB);
            t.limit = 0;
            st.target = Some(t);
            st.busy = Some((MIB, MIB + PIECE_BYTES, st.generation));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let cutter = {
            let z = z.clone();
            std::thread::spawn(move || tx.send(z.retarget(None)).unwrap())
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "waits while the piece is written"
        );
        z.lock().busy = None;
        z.shared.changed.notify_all();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            2 * MIB,
            "how far the old file reaches"
        );
        cutter.join().unwrap();
    }
}
