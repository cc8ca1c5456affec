//! `RaftLogStorage` over the segmented log in `rampart_storage::log`.
//!
//! Group commit: `append` writes the records at once (so they are readable when it returns, as
//! openraft requires) and hands the flush callback to one syncer thread. The syncer takes every
//! callback queued so far, does a single fdatasync for all of them, then completes them in order.
//! Under load many client writes share one fsync; a lone write still gets its own at once.
//!
//! The vote and the purge point are small files replaced atomically (`rampart_storage::meta`).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use rampart_storage::log::{LogOptions, LogStore as SegmentLog};
use rampart_storage::meta;

use crate::codec::{self, META_FORMAT_V1};
use crate::{Entry, LogId, TypeConfig};

type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

const VOTE_FILE: &str = "vote.meta";
/// Not `purged.meta`: the segment log keeps its own purge point under that name in this dir.
const PURGED_FILE: &str = "purged_log_id.meta";
const COMMITTED_FILE: &str = "committed.meta";
const SLOW_LOG_SYNC: Duration = Duration::from_millis(rampart_core::limits::SLOW_LOG_SYNC_MS);

#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<SegmentLog>>,
    dir: PathBuf,
    syncer: mpsc::Sender<IOFlushed<TypeConfig>>,
    /// The last known commit index, rewritten in place (no fsync) on every commit, so a restart
    /// re-applies everything that was committed (openraft's "persisted committed").
    committed: Arc<meta::HintFile>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LogStore {
    /// Opens the log under `dir`, verifying every record. A corrupt record fails here, before the
    /// member joins the cluster.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        let log = SegmentLog::open(dir, LogOptions::default()).map_err(io_err)?;
        let inner = Arc::new(Mutex::new(log));
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        let sync_log = inner.clone();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || syncer(sync_log, rx))?;
        let committed = meta::HintFile::open(&dir.join(COMMITTED_FILE))?;
        Ok(LogStore { inner, dir: dir.to_path_buf(), syncer: tx, committed: Arc::new(committed) })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, file: &str) -> io::Result<Option<T>> {
        match meta::read(&self.dir.join(file)).map_err(io_err)? {
            None => Ok(None),
            Some(bytes) => codec::decode_versioned(META_FORMAT_V1, &bytes, file).map(Some),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, file: &str, value: &T) -> io::Result<()> {
        meta::write_atomic(&self.dir.join(file), &codec::encode_versioned(META_FORMAT_V1, value)).map_err(io_err)
    }

    /// The commit hint `c` if this log can back it: the entry it names is in the log, or was
    /// purged behind a snapshot (which the state machine already holds). The hint is written
    /// without allocating (overwritten in place) while the entries it covers may still have been
    /// only in memory, so when the disk fills up, or power fails, it can name entries that never
    /// reached the log. openraft re-applies up to the hint on start and refuses to start when the
    /// entries are missing, so such a hint would keep the member down for good (bug 6 in
    /// docs/robustness.md). Without it the member learns the commit index from the leader.
    fn hint_if_held(&self, c: LogId) -> io::Result<Option<LogId>> {
        let purged: Option<LogId> = self.read_meta(PURGED_FILE)?;
        if purged.as_ref().is_some_and(|p| c.index <= p.index) {
            return Ok(Some(c));
        }
        let held = match self.inner.lock().unwrap().read(c.index).map_err(io_err)? {
            Some(bytes) => codec::decode_entry(&bytes)?.log_id == c,
            None => false,
        };
        if held {
            Ok(Some(c))
        } else {
            tracing::warn!(hint = %c, "ignoring a commit hint that names an entry the log does not hold (its unsynced tail was lost)");
            Ok(None)
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner.lock().unwrap().size_bytes()
    }
}

/// The group-commit loop: one fdatasync for everything queued, then complete callbacks in order.
fn syncer(log: Arc<Mutex<SegmentLog>>, rx: mpsc::Receiver<IOFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // The fsync runs without the log's lock: appends (the raft core waits on those) and
        // reads for replication go on while the disk works, instead of queueing behind it.
        let started = Instant::now();
        let mut timings = None;
        let result = (|| {
            let pending = log.lock().unwrap().begin_sync()?;
            let Some(pending) = pending else { return Ok(()) };
            let written = started.elapsed();
            let synced = pending.run();
            timings = Some((written, started.elapsed() - written));
            log.lock().unwrap().finish_sync(synced)
        })()
        .map_err(io_err);
        let took = started.elapsed();
        if let Some((written, synced)) = timings.filter(|_| took >= SLOW_LOG_SYNC) {
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                lock_and_write_ms = written.as_millis() as u64,
                fdatasync_ms = synced.as_millis() as u64,
                appends = batch.len(),
                "slow raft log sync"
            );
        }
        for cb in batch {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            cb.io_completed(r);
        }
    }
}

fn range_to_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(x) => x.saturating_add(1),
        Bound::Excluded(x) => *x,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = range_to_bounds(&range);
        let records = self.inner.lock().unwrap().read_range(start, end).map_err(io_err)?;
        records
            .into_iter()
            .map(|(index, bytes)| {
                let entry = codec::decode_entry(&bytes)?;
                // A record stored under one index but naming another is corruption, not a read.
                assert_eq!(entry.log_id.index, index, "raft log record index mismatch");
                Ok(entry)
            })
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(VOTE_FILE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = self.read_meta(PURGED_FILE)?;
        let last = {
            let log = self.inner.lock().unwrap();
            match log.last_index() {
                None => None,
                Some(i) => log.read(i).map_err(io_err)?,
            }
        };
        let last_log_id = match last {
            Some(bytes) => Some(codec::decode_entry(&bytes)?.log_id),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // write_atomic fsyncs before returning: a vote must never be forgotten after a crash, or
        // this member could vote twice in one term.
        self.write_meta(VOTE_FILE, vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.committed.overwrite(&codec::encode_versioned(META_FORMAT_V1, &committed))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        // A hint only: a torn or missing file (possible after a power loss, since it is not
        // fsynced) means "unknown", and the member learns the commit index from the leader.
        if self.committed.is_empty() {
            return Ok(None); // never saved yet
        }
        match meta::read(&self.dir.join(COMMITTED_FILE)) {
            Ok(Some(bytes)) => match codec::decode_versioned::<Option<LogId>>(META_FORMAT_V1, &bytes, COMMITTED_FILE) {
                Ok(Some(c)) => self.hint_if_held(c),
                Ok(None) => Ok(None),
                Err(e) => {
                    tracing::warn!(%e, "ignoring unreadable commit hint");
                    Ok(None)
                }
            },
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(%e, "ignoring unreadable commit hint");
                Ok(None)
            }
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut log = self.inner.lock().unwrap();
            for entry in entries {
                log.append(entry.log_id.index, &codec::encode_entry(&entry)).map_err(io_err)?;
            }
        }
        self.syncer.send(callback).map_err(|_| io::Error::other("raft log syncer thread stopped"))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        self.inner.lock().unwrap().truncate_from(from).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // The purge point is recorded first: openraft ignores entries at or below it, so a crash
        // between the two steps leaves extra records that are never read, never a gap.
        self.write_meta(PURGED_FILE, &log_id)?;
        self.inner.lock().unwrap().purge_to(log_id.index).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;
    use openraft::storage::StorageHelper;
    use openraft::testing::log_id;

    use super::*;
    use crate::state_machine::StateMachine;

    /// Opens the log, waiting for a dropped store's syncer thread to let go of it.
    fn reopen(dir: &Path) -> LogStore {
        for _ in 0..100 {
            match LogStore::open(dir) {
                Ok(log) => return log,
                Err(e) if e.to_string().contains("already open") => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the raft log stayed locked");
    }

    fn id(index: u64) -> LogId {
        log_id::<TypeConfig>(1, 1, index)
    }

    /// Entries 0..=5 (openraft starts at 0) durable in the log, then a commit hint for `hint`, as a member leaves them
    /// when its disk fills up after the hint was written but before entries above 5 were.
    fn member_dir_with_hint(hint: LogId) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut log = reopen(&dir.path().join("wal"));
        {
            let mut inner = log.inner.lock().unwrap();
            for i in 0..=5 {
                inner.append(i, &codec::encode_entry(&Entry::new_blank(id(i)))).unwrap();
            }
            inner.sync().unwrap();
        }
        futures::executor::block_on(log.save_committed(Some(hint))).unwrap();
        dir
    }

    /// What a member does first on start; returns what its state machine has applied after it.
    async fn start(dir: &Path) -> Result<Option<LogId>, openraft::StorageError<TypeConfig>> {
        use openraft::storage::RaftStateMachine;
        let mut log = reopen(&dir.join("wal"));
        let mut sm = StateMachine::open(&dir.join("kv.redb"), &dir.join("snap")).unwrap();
        StorageHelper::new(&mut log, &mut sm).with_id(1).get_initial_state().await?;
        Ok(sm.applied_state().await.unwrap().0)
    }

    #[tokio::test]
    async fn a_commit_hint_ahead_of_the_log_does_not_keep_the_member_down() {
        // Bug 6: openraft re-applies up to the hint on start and refused to start at all when
        // the entries it names were lost with the unsynced tail.
        let dir = member_dir_with_hint(id(8));
        let mut log = reopen(&dir.path().join("wal"));
        assert_eq!(log.read_committed().await.unwrap(), None);
        drop(log);
        assert_eq!(start(dir.path()).await.expect("the member starts"), None);

        // A hint naming an entry the log holds under another term is not backed either.
        let dir = member_dir_with_hint(log_id::<TypeConfig>(2, 1, 4));
        let mut log = reopen(&dir.path().join("wal"));
        assert_eq!(log.read_committed().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_commit_hint_the_log_holds_is_used() {
        let dir = member_dir_with_hint(id(4));
        let mut log = reopen(&dir.path().join("wal"));
        assert_eq!(log.read_committed().await.unwrap(), Some(id(4)));
        drop(log);
        // Start re-applies the committed entries to the (empty) state machine.
        assert_eq!(start(dir.path()).await.unwrap(), Some(id(4)));
    }
}
