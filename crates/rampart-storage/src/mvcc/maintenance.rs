//! What etcd's Maintenance service needs from the store: hashes for consistency checks, a
//! snapshot with its revision, defragmentation, and clearing the raft layer's bytes for a
//! snapshot restored into a new cluster.
//!
//! Defragmentation is redb's `compact`, which needs `&mut Database` and no live transaction.
//! So the handle sits behind [`Db`], a read-write lock that every transaction takes shared just
//! long enough to begin (a redb transaction does not borrow the handle), and that only
//! [`Mvcc::defragment`] takes exclusively. While it does, reads and writes on this member wait,
//! as they do during etcd's own defrag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rampart_core::EtcdError;
use redb::{
    CompactionError, Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    WriteTransaction,
};

use super::codec;
use super::{
    read_meta_revs, snapshot, Fail, Mvcc, MvccError, KV_BY_REV, LEASES, META, META_RAFT_META,
};

/// The redb handle, shared by every transaction and taken exclusively only to defragment, and
/// the applied writes not yet committed to it (see [`Db::park`]).
pub(super) struct Db {
    /// Declared first: if `Drop` could not commit it, it drops (aborts) before the handle closes.
    parked: Mutex<Option<Parked>>,
    /// True while `parked` holds a transaction: a reader must commit it before it begins.
    dirty: AtomicBool,
    /// Set when a commit of parked writes failed: the store has lost writes the raft layer
    /// considers applied, and only a restart (which replays them from the raft log) repairs that.
    failed: AtomicBool,
    handle: RwLock<Database>,
}

impl Drop for Db {
    /// Parked writes are committed before the handle closes (redb makes them durable as it
    /// closes), so a clean stop leaves nothing to replay.
    fn drop(&mut self) {
        if let Err(e) = self.commit_parked() {
            tracing::warn!(error = %e, "applied writes not committed at close; the raft log replays them");
        }
    }
}

/// An open write transaction holding applied batches that no reader has needed yet.
pub(super) struct Parked {
    pub txn: WriteTransaction,
    /// When its first batch was applied.
    pub since: Instant,
}

impl Db {
    pub(super) fn new(db: Database) -> Db {
        Db {
            parked: Mutex::new(None),
            dirty: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            handle: RwLock::new(db),
        }
    }

    /// The handle, shared. Hold it no longer than needed: a defragmentation waits for it.
    pub(super) fn shared(&self) -> RwLockReadGuard<'_, Database> {
        // A panic while holding the lock cannot leave the Database half-changed: redb's own
        // transactions are atomic. So a poisoned lock is still a good lock.
        self.handle.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// A read transaction that sees every batch applied so far (parked ones are committed first).
    pub(super) fn begin_read(&self) -> Result<ReadTransaction, MvccError> {
        self.commit_parked()?;
        Ok(self.shared().begin_read()?)
    }

    /// A write transaction of its own, after the parked writes are committed (redb has one writer
    /// at a time, and a parked transaction is that writer).
    pub(super) fn begin_write(&self) -> Result<WriteTransaction, MvccError> {
        self.commit_parked()?;
        Ok(self.shared().begin_write()?)
    }

    /// The parked transaction, locked: the apply path continues it, or begins a new one. Holding
    /// the guard keeps readers that need the parked writes waiting until they are back or
    /// committed.
    pub(super) fn parked(&self) -> Result<MutexGuard<'_, Option<Parked>>, MvccError> {
        self.check_failed()?;
        Ok(self.parked.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Parks `txn` (applied, uncommitted) in `slot` for the next batch or the next reader.
    pub(super) fn park(&self, slot: &mut Option<Parked>, parked: Parked) {
        *slot = Some(parked);
        self.dirty.store(true, Ordering::Release);
    }

    /// Commits `txn`, which holds everything parked (it was taken from the slot), with the
    /// given durability.
    pub(super) fn commit(&self, mut txn: WriteTransaction, durable: bool) -> Result<(), MvccError> {
        let result = (|| {
            txn.set_durability(if durable { Durability::Immediate } else { Durability::None })?;
            txn.commit()?;
            Ok::<(), MvccError>(())
        })();
        if result.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        self.dirty.store(false, Ordering::Release);
        result
    }

    /// Makes every commit so far durable: an empty transaction committed with fsync (redb
    /// persists the non-durable commits before it with it).
    pub(super) fn sync(&self) -> Result<(), MvccError> {
        let txn = self.shared().begin_write()?;
        self.commit(txn, true)
    }

    /// Marks the store failed after a batch broke off halfway: its transaction (with every parked
    /// batch) is dropped uncommitted.
    pub(super) fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        self.dirty.store(false, Ordering::Release);
    }

    /// Commits the parked writes, if any (without fsync: the raft log is their durable record).
    pub(super) fn commit_parked(&self) -> Result<(), MvccError> {
        if self.dirty.load(Ordering::Acquire) {
            let mut slot = self.parked()?;
            if let Some(p) = slot.take() {
                self.commit(p.txn, false)?;
            }
        }
        self.check_failed()
    }

    fn check_failed(&self) -> Result<(), MvccError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(MvccError::Corrupt(
                "an earlier commit of applied writes failed; restart the member to replay them from the raft log".into(),
            ));
        }
        Ok(())
    }

    /// Exclusive access to the handle, for redb's compaction (nothing parked, no transaction).
    fn exclusive(&self) -> RwLockWriteGuard<'_, Database> {
        self.handle.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// etcd's HashKV answer: a hash of the key space up to `hash_revision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHash {
    /// crc32c over every stored version (big-endian revision, then the `kv_by_rev` value with
    /// its key) with a revision at most `hash_revision`, in revision order.
    pub hash: u32,
    /// The store's newest revision when the hash was taken.
    pub current_revision: i64,
    /// The compaction revision then, -1 if never compacted (etcd's `compactMainRev`).
    pub compact_revision: i64,
    pub hash_revision: i64,
}

/// Sizes around one defragmentation, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defragmented {
    pub before_bytes: u64,
    pub after_bytes: u64,
}

/// How long one exclusive hold waits for live reads to finish before letting others run again.
const DEFRAG_HOLD: Duration = Duration::from_millis(50);
const DEFRAG_POLL: Duration = Duration::from_millis(1);
const DEFRAG_BACKOFF: Duration = Duration::from_millis(10);

fn hash_table<K: redb::Key + 'static>(
    h: &mut u32,
    name: &str,
    table: &impl ReadableTable<K, &'static [u8]>,
    skip: impl Fn(&[u8]) -> bool,
) -> Result<(), MvccError> {
    *h = crc32c::crc32c_append(*h, name.as_bytes());
    for entry in table.iter()? {
        let (k, v) = entry?;
        let key = k.value();
        let key = K::as_bytes(&key);
        if skip(key.as_ref()) {
            continue;
        }
        *h = crc32c::crc32c_append(*h, key.as_ref());
        *h = crc32c::crc32c_append(*h, v.value());
    }
    Ok(())
}

impl Mvcc {
    /// etcd's Hash: a crc32c of the whole store (every table, in a fixed order) and the revision it
    /// was taken at. The raft layer's bytes are left out, as etcd leaves out its consistent index,
    /// so two members holding the same data hash alike.
    pub fn hash(&self) -> Result<(u32, i64), MvccError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let (current, _) = read_meta_revs(&meta)?;
        let mut h = 0u32;
        hash_table(&mut h, "meta", &meta, |k| k == META_RAFT_META.as_bytes())?;
        hash_table(&mut h, "kv_by_rev", &txn.open_table(KV_BY_REV)?, |_| false)?;
        hash_table(&mut h, "leases", &txn.open_table(LEASES)?, |_| false)?;
        Ok((h, current))
    }

    /// etcd's HashKV: a hash of the MVCC key space up to `revision` (0 = the newest). Every member
    /// holds the same versions at the same revision (compaction removes them when it is applied),
    /// so members that agree hash alike at any revision both still have.
    ///
    /// `Compacted` for `0 < revision <= compaction revision`, `FutureRev` above the newest.
    pub fn hash_kv(&self, revision: i64) -> Result<KvHash, EtcdError> {
        let run = || -> Result<KvHash, Fail> {
            let txn = self.db.begin_read()?;
            let (current, compact) = read_meta_revs(&txn.open_table(META)?)?;
            if revision > 0 && revision <= compact {
                return Err(EtcdError::Compacted.into());
            }
            if revision > current {
                return Err(EtcdError::FutureRev.into());
            }
            // As etcd: 0 is the newest; a negative revision hashes nothing.
            let upto = if revision == 0 { current } else { revision };
            let kv = txn.open_table(KV_BY_REV)?;
            let mut h = crc32c::crc32c(b"kv_by_rev");
            let upto_key = codec::Rev {
                main: upto.max(0),
                sub: i64::MAX,
            }
            .to_u128();
            for entry in kv.range(..=upto_key)? {
                let (k, v) = entry?;
                h = crc32c::crc32c_append(h, &k.value().to_be_bytes());
                h = crc32c::crc32c_append(h, v.value());
            }
            Ok(KvHash {
                hash: h,
                current_revision: current,
                compact_revision: compact,
                hash_revision: upto,
            })
        };
        run().map_err(Fail::into_etcd)
    }

    /// [`Mvcc::write_snapshot`], also returning the revision the snapshot holds.
    pub fn write_snapshot_at(&self, w: &mut dyn std::io::Write) -> Result<i64, MvccError> {
        let txn = self.db.begin_read()?;
        let (current, _) = read_meta_revs(&txn.open_table(META)?)?;
        snapshot::write(&txn, w)?;
        Ok(current)
    }

    /// Forgets the raft layer's bytes (last applied log id, membership), keeping the data: a
    /// snapshot restored into a new cluster must look like a store that never saw a raft log.
    pub fn clear_raft_meta(&self) -> Result<(), MvccError> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let txn = self.db.begin_write()?;
        {
            let mut meta: redb::Table<&str, &[u8]> = txn.open_table(META)?;
            meta.remove(META_RAFT_META)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Gives free pages back to the file system (etcd's defrag). Writes wait for the whole of it
    /// and reads for the compaction itself; live reads are waited for, at most `wait` in all.
    ///
    /// The compaction commits durably, so it also makes every earlier unsynced commit durable.
    pub fn defragment(&self, wait: Duration) -> Result<Defragmented, MvccError> {
        let before_bytes = self.db_size_bytes();
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        // Nothing is parked while `writing` is held and this is done: compaction needs no live
        // transaction.
        self.db.commit_parked()?;
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut db = self.db.exclusive();
                // New transactions now wait at the lock; the ones already running finish soon.
                let hold_until = Instant::now() + DEFRAG_HOLD;
                loop {
                    match db.compact() {
                        Ok(_) => {
                            return Ok(Defragmented {
                                before_bytes,
                                after_bytes: self.db_size_bytes(),
                            })
                        }
                        Err(CompactionError::TransactionInProgress)
                            if Instant::now() < hold_until =>
                        {
                            std::thread::sleep(DEFRAG_POLL)
                        }
                        Err(CompactionError::TransactionInProgress) => break,
                        Err(e) => return Err(MvccError::Storage(e.into())),
                    }
                }
            }
            // A long read (a snapshot being streamed) holds on: let the others run meanwhile.
            if Instant::now() >= deadline {
                return Err(MvccError::Storage(redb::Error::TransactionInProgress));
            }
            std::thread::sleep(DEFRAG_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use rampart_proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest};
    use rampart_proto::rampartpb::{command, Command};

    use super::*;

    fn open(dir: &tempfile::TempDir, name: &str) -> Mvcc {
        Mvcc::open(&dir.path().join(name)).unwrap()
    }

    fn apply(m: &Mvcc, request: command::Request) {
        let cmd = Command {
            request: Some(request),
        };
        m.apply(&[Some(&cmd)], b"raft", false).unwrap()[0]
            .as_ref()
            .unwrap();
    }

    fn put(m: &Mvcc, k: &str, v: &str) {
        apply(
            m,
            command::Request::Put(PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
        );
    }

    #[test]
    fn hash_kv_is_equal_for_equal_histories_and_checks_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open(&dir, "a"), open(&dir, "b"));
        for m in [&a, &b] {
            put(m, "k1", "v1");
            put(m, "k2", "v2");
            put(m, "k1", "v3");
        }
        // Different raft bytes must not matter.
        b.apply(&[], b"other raft meta", false).unwrap();
        let (ha, hb) = (a.hash_kv(0).unwrap(), b.hash_kv(0).unwrap());
        assert_eq!(ha, hb);
        assert_eq!(
            (ha.current_revision, ha.compact_revision, ha.hash_revision),
            (4, -1, 4)
        );
        assert_eq!(a.hash().unwrap(), b.hash().unwrap());

        let at3 = a.hash_kv(3).unwrap();
        assert_eq!(at3.hash_revision, 3);
        assert_ne!(at3.hash, ha.hash);
        put(&a, "k3", "v4");
        // The past does not change with new writes; the present does.
        assert_eq!(a.hash_kv(3).unwrap().hash, at3.hash);
        assert_eq!(a.hash_kv(4).unwrap().hash, ha.hash);
        assert_ne!(a.hash_kv(0).unwrap().hash, ha.hash);
        assert_ne!(a.hash().unwrap(), b.hash().unwrap());

        assert_eq!(a.hash_kv(6), Err(EtcdError::FutureRev));
        apply(
            &a,
            command::Request::Compaction(CompactionRequest {
                revision: 3,
                ..Default::default()
            }),
        );
        assert_eq!(a.hash_kv(3), Err(EtcdError::Compacted));
        assert_eq!(a.hash_kv(2), Err(EtcdError::Compacted));
        let after = a.hash_kv(0).unwrap();
        assert_eq!((after.compact_revision, after.hash_revision), (3, 5));
    }

    #[test]
    fn defragment_shrinks_the_file_and_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(&dir, "m");
        let big = "x".repeat(64 * 1024);
        for i in 0..100 {
            put(&m, &format!("k{i}"), &big);
        }
        apply(
            &m,
            command::Request::DeleteRange(DeleteRangeRequest {
                key: "k".into(),
                range_end: "l".into(),
                ..Default::default()
            }),
        );
        put(&m, "keep", "me");
        apply(
            &m,
            command::Request::Compaction(CompactionRequest {
                revision: m.current_revision(),
                ..Default::default()
            }),
        );
        let before = m.hash_kv(0).unwrap();
        // A read running meanwhile only delays it.
        let reader = m.db.begin_read().unwrap();
        std::thread::scope(|s| {
            let t = s.spawn(|| m.defragment(Duration::from_secs(5)).unwrap());
            std::thread::sleep(Duration::from_millis(30));
            drop(reader);
            let d = t.join().unwrap();
            assert!(
                d.after_bytes < d.before_bytes / 2,
                "{d:?} should have shrunk"
            );
        });
        assert_eq!(m.hash_kv(0).unwrap(), before);
        put(&m, "after", "defrag");
        assert_eq!(m.current_revision(), before.current_revision + 1);
    }

    #[test]
    fn defragment_gives_up_on_a_read_that_does_not_end() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(&dir, "m");
        let _reader = m.db.begin_read().unwrap();
        assert!(m.defragment(Duration::from_millis(100)).is_err());
    }

    #[test]
    fn snapshot_with_revision_and_cleared_raft_meta() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open(&dir, "a"), open(&dir, "b"));
        put(&a, "k", "v");
        let mut bytes = Vec::new();
        assert_eq!(a.write_snapshot_at(&mut bytes).unwrap(), 2);
        b.restore_snapshot(&mut bytes.as_slice()).unwrap();
        assert_eq!(b.raft_meta().unwrap().as_deref(), Some(&b"raft"[..]));
        b.clear_raft_meta().unwrap();
        assert_eq!(b.raft_meta().unwrap(), None);
        assert_eq!(b.hash_kv(0).unwrap(), a.hash_kv(0).unwrap());
    }
}
