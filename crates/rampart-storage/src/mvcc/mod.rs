//! etcd's multi-version key-value model on redb: revisions, ranges, txns, compaction and the
//! change feed, with the semantics of etcd 3.4/3.5.
//!
//! The raft state machine drives it: [`Mvcc::apply`] applies a batch of committed commands in
//! a redb write transaction together with the raft layer's own bytes (last applied log id,
//! membership), so that the data and the applied index can never disagree after a crash.
//!
//! Consecutive batches share one write transaction for up to `COMMIT_INTERVAL` (the transaction
//! is *parked* between them, see `maintenance::Db`), because a redb commit copies every page it
//! touched: under load that copying, not the writes themselves, was most of a batch's cost. Every
//! read ([`Mvcc::range`], [`Mvcc::read_txn`], [`Mvcc::events_since`], hashes, snapshots) first
//! commits what is parked, so a read always sees every batch applied before it began.
//!
//! # Storage layout (format version 2)
//!
//! | table       | key                        | value                               |
//! |-------------|----------------------------|-------------------------------------|
//! | `kv_by_rev` | u128 `main << 64 \| sub`   | `[2, 0]` ++ le32 key length ++ key ++ be64 create, version, lease ++ value; or `[2, 1]` ++ le32 key length ++ key: tombstone |
//! | `meta`      | `format_version`, `current_rev`, `compact_rev`, `raft_meta` | LE u32 / LE i64 / LE i64 / raw bytes |
//! | `leases`    | i64 lease id               | `[1]` ++ be64 granted TTL ++ be64 remaining TTL (see `lease`) |
//!
//! Every version of every key is one row of `kv_by_rev`, in revision order, as etcd keeps its
//! `key` bucket: a write appends at the end of the B-tree, so a batch dirties a few pages however
//! scattered its keys are, and the change feed and compaction read it in order. Which revisions
//! a key has is the key index, kept in memory (see `index`, etcd's `treeIndex`); which keys are
//! attached to which lease likewise (see `lease`). Both are rebuilt from `kv_by_rev` on open.
//! The first byte of every stored value is its record format.
//!
//! Format 1 kept versions in a `kv` table keyed by user key and revision, plus a `revs` table of
//! revision to key: every write inserted into a random leaf of `kv`, and every commit copied
//! those leaves (finding 15 in docs/performance.md). A format 1 file is migrated to format 2 in
//! one write transaction when it opens (`migrate_v1`); format 1 snapshots are converted as they
//! are restored.

mod codec;
mod index;
mod lease;
mod maintenance;
mod read;
mod snapshot;
mod validate;
mod write;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rampart_core::EtcdError;
use rampart_proto::etcdserverpb::{
    CompactionResponse, DeleteRangeResponse, LeaseGrantResponse, LeaseRevokeResponse, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use rampart_proto::mvccpb::event::EventType;
use rampart_proto::mvccpb::{Event, KeyValue};
use rampart_proto::rampartpb::Command;
use redb::{ReadableTable, TableDefinition};

use codec::{KvKey, Record, Rev};
use index::KeyIndex;
use read::View;

pub use lease::Lease;
pub use maintenance::{Defragmented, KvHash};
pub use snapshot::SNAPSHOT_VERSION;

/// A frozen view of the store (see [`Mvcc::snapshot_view`]).
pub struct SnapshotView {
    txn: redb::ReadTransaction,
}

impl SnapshotView {
    /// Streams the viewed state, `raft_meta` included, in the snapshot format.
    pub fn write(&self, w: &mut dyn std::io::Write) -> Result<(), MvccError> {
        snapshot::write(&self.txn, w)
    }

    /// The raft layer's bytes as of the view.
    pub fn raft_meta(&self) -> Result<Option<Vec<u8>>, MvccError> {
        let meta = self.txn.open_table(META)?;
        Ok(meta.get(META_RAFT_META)?.map(|v| v.value().to_vec()))
    }
}

impl std::fmt::Debug for SnapshotView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotView")
    }
}

/// Version of the layout described in the module docs, stored in the `meta` table and checked
/// on open.
pub const FORMAT_VERSION: u32 = 2;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KV_BY_REV: TableDefinition<u128, &[u8]> = TableDefinition::new("kv_by_rev");
/// Format 1 tables, read only to migrate them.
const KV_V1: TableDefinition<KvKey, &[u8]> = TableDefinition::new("kv");
const REVS_V1: TableDefinition<u128, &[u8]> = TableDefinition::new("revs");
const LEASES: TableDefinition<i64, &[u8]> = TableDefinition::new("leases");

const META_FORMAT_VERSION: &str = "format_version";
const META_CURRENT_REV: &str = "current_rev";
const META_COMPACT_REV: &str = "compact_rev";
const META_RAFT_META: &str = "raft_meta";

/// How long applied batches may stay in one open write transaction (parked) before it is
/// committed, when no reader asks for them sooner. Every commit copies the B-tree pages it
/// touched, so fewer commits mean less copying per write; etcd's backend commits every 100 ms.
const COMMIT_INTERVAL: Duration = Duration::from_millis(50);

/// etcd's revision of an empty store.
const FIRST_REV: i64 = 1;
/// Compaction revision of a store never compacted (etcd's initial `compactMainRev`).
const NEVER_COMPACTED: i64 = -1;

/// A failure of this member's storage, as opposed to an answer to the client ([`EtcdError`]).
#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    #[error("mvcc storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("mvcc i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data contradicts itself, or an invariant of this module broke.
    #[error("mvcc data is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "mvcc file format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedFormat { found: u32, supported: u32 },
    /// A snapshot stream was rejected; the state was left as it was.
    #[error("invalid mvcc snapshot: {0}")]
    InvalidSnapshot(String),
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for MvccError {
            fn from(e: $t) -> Self {
                MvccError::Storage(e.into())
            }
        }
    )*};
}
redb_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Why an operation stopped: the client's answer, or a storage failure.
pub(crate) enum Fail {
    Etcd(EtcdError),
    Store(MvccError),
}

impl From<EtcdError> for Fail {
    fn from(e: EtcdError) -> Self {
        Fail::Etcd(e)
    }
}

impl<E: Into<MvccError>> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail::Store(e.into())
    }
}

impl Fail {
    fn into_etcd(self) -> EtcdError {
        match self {
            Fail::Etcd(e) => e,
            Fail::Store(e) => storage_failed(e),
        }
    }
}

fn storage_failed(e: MvccError) -> EtcdError {
    tracing::error!(error = %e, "mvcc read failed");
    EtcdError::internal(e)
}

/// The response to a command that went through the log.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
}

/// One applied command.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub response: WriteResponse,
    /// The store's revision after the command (unchanged if it wrote nothing).
    pub revision: i64,
    /// What the command changed, in order, for watchers: `prev_kv` is the key as of the
    /// revision before, and absent on a create (as etcd's watch server fills it).
    pub events: Vec<Event>,
}

/// The MVCC store of one member.
pub struct Mvcc {
    db: maintenance::Db,
    path: PathBuf,
    current_rev: AtomicI64,
    /// Raw: -1 if never compacted.
    compact_rev: AtomicI64,
    /// Keeps `apply` and `restore_snapshot` one at a time, so the cached revisions follow the
    /// commits in order.
    writing: Mutex<()>,
    /// Leases and their attached keys, matching the last applied batch (see `lease`).
    leases: RwLock<lease::LeaseIndex>,
    /// Every key's versions (see `index`). Lock order: `writing`, `leases`, then this.
    index: RwLock<KeyIndex>,
    /// Bumped, with `index` write-locked, each time the index is rebuilt (see `Mvcc::read`).
    index_generation: std::sync::atomic::AtomicU64,
}

/// How many times a read runs when the key index is rebuilt under it (see `Mvcc::read`).
const READ_ATTEMPTS: u32 = 3;

fn read_meta_revs(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<(i64, i64), MvccError> {
    let get = |name: &str| -> Result<i64, MvccError> {
        let v = meta
            .get(name)?
            .ok_or_else(|| MvccError::Corrupt(format!("meta {name} is missing")))?;
        codec::decode_i64(name, v.value())
    };
    let (current, compact) = (get(META_CURRENT_REV)?, get(META_COMPACT_REV)?);
    if current < FIRST_REV || compact < NEVER_COMPACTED || compact > current {
        return Err(MvccError::Corrupt(format!(
            "meta revisions current={current} compact={compact}"
        )));
    }
    Ok((current, compact))
}

impl Mvcc {
    /// Opens the store at `path`, creating it if missing. A file written in another format
    /// version is refused with [`MvccError::UnsupportedFormat`].
    pub fn open(path: &Path) -> Result<Mvcc, MvccError> {
        let db = redb::Builder::new()
            .set_cache_size(rampart_core::limits::MVCC_CACHE_BYTES)
            .create(path)?;
        let txn = db.begin_write()?;
        let fresh = txn.list_tables()?.next().is_none();
        {
            let mut meta = txn.open_table(META)?;
            let version = meta
                .get(META_FORMAT_VERSION)?
                .map(|v| codec::decode_u32(META_FORMAT_VERSION, v.value()))
                .transpose()?;
            match version {
                Some(FORMAT_VERSION) => {}
                Some(1) => {
                    tracing::info!(path = %path.display(), "migrating the mvcc store from format 1 to 2");
                    migrate_v1(&txn, &mut meta)?;
                }
                Some(found) => {
                    return Err(MvccError::UnsupportedFormat {
                        found,
                        supported: FORMAT_VERSION,
                    })
                }
                None if fresh => {
                    meta.insert(META_FORMAT_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
                    meta.insert(META_CURRENT_REV, FIRST_REV.to_le_bytes().as_slice())?;
                    meta.insert(META_COMPACT_REV, NEVER_COMPACTED.to_le_bytes().as_slice())?;
                }
                None => {
                    return Err(MvccError::Corrupt(format!(
                        "{} has tables but no format version: not an mvcc store",
                        path.display()
                    )))
                }
            }
            txn.open_table(KV_BY_REV)?;
            txn.open_table(LEASES)?;
            read_meta_revs(&meta)?;
        }
        txn.commit()?;
        let db = maintenance::Db::new(db);
        let (current, compact, index, leases) = {
            let txn = db.begin_read()?;
            let (current, compact) = read_meta_revs(&txn.open_table(META)?)?;
            let (index, leases) = load_indexes(&txn, 0)?;
            (current, compact, index, leases)
        };
        Ok(Mvcc {
            db,
            path: path.to_path_buf(),
            current_rev: AtomicI64::new(current),
            compact_rev: AtomicI64::new(compact),
            writing: Mutex::new(()),
            leases: RwLock::new(leases),
            index: RwLock::new(index),
            index_generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Rebuilds the key and lease indexes from committed data, after a restore or a failed batch.
    fn reload_indexes(
        &self,
        leases: &mut lease::LeaseIndex,
        index: &mut KeyIndex,
    ) -> Result<(), MvccError> {
        let txn = self.db.begin_read()?;
        (*index, *leases) = load_indexes(&txn, leases.seq())?;
        self.index_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, KeyIndex> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// etcd's Range on the committed state. Whether the read is linearizable is decided above.
    /// The header has only `revision` filled: the newest revision at read time.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, EtcdError> {
        validate::range(req)?;
        self.read(|txn, index| {
            let (current, compact) = read_meta_revs(&txn.open_table(META)?)?;
            let kv = txn.open_table(KV_BY_REV)?;
            let view = View {
                kv: &kv,
                index,
            };
            read::range_request(&view, req, current, compact)
        })
    }

    /// Runs `f` on a read transaction and the key index. If the index was rebuilt meanwhile (a
    /// snapshot restored: the transaction and the index may then describe different stores), the
    /// read runs again; the last of [`READ_ATTEMPTS`] holds the index for its whole length, which
    /// keeps a restore out (a restore holds the index exclusively from before it replaces the
    /// store until the index is rebuilt).
    fn read<R>(&self, f: impl Fn(&redb::ReadTransaction, &read::IndexAccess<'_>) -> Result<R, Fail>) -> Result<R, EtcdError> {
        for _ in 1..READ_ATTEMPTS {
            let generation = self.index_generation.load(Ordering::Acquire);
            let txn = self.db.begin_read().map_err(storage_failed)?;
            let result = f(&txn, &read::IndexAccess::Shared(&self.index));
            if generation == self.index_generation.load(Ordering::Acquire) {
                return result.map_err(Fail::into_etcd);
            }
        }
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let txn = self.db.begin_read().map_err(storage_failed)?;
        f(&txn, &read::IndexAccess::Held(&index)).map_err(Fail::into_etcd)
    }

    /// A txn that only reads (ranges and nested read-only txns, in both branches), served from
    /// the committed state without going through the log, as etcd serves read-only txns. A txn
    /// that writes is refused with InvalidArgument. Header as in [`Mvcc::range`].
    pub fn read_txn(&self, req: &TxnRequest) -> Result<TxnResponse, EtcdError> {
        self.read(|txn, index| {
            let (current, compact) = read_meta_revs(&txn.open_table(META)?)?;
            let kv = txn.open_table(KV_BY_REV)?;
            let view = View {
                kv: &kv,
                index,
            };
            write::read_only_txn(&view, req, current, compact)
        })
    }

    /// Applies a batch of committed raft entries in a redb write transaction, together with
    /// `raft_meta` (opaque bytes of the raft layer). `durable`: commit with fsync before
    /// returning, this batch and every one before it; otherwise the batch may stay parked
    /// uncommitted (readers commit it when they need it) or be committed without fsync, and a
    /// crash may lose it (data and `raft_meta` together): the raft layer replays it from its log.
    ///
    /// `None` items (entries without a command) are skipped. Returns one result per `Some`
    /// item, in order; a rejected command changed nothing. `Err` means storage failed: nothing
    /// of the batch, nor of the parked batches before it, was committed, and every later call
    /// fails until the member restarts and replays them from its raft log.
    pub fn apply(
        &self,
        batch: &[Option<&Command>],
        raft_meta: &[u8],
        durable: bool,
    ) -> Result<Vec<Result<Applied, EtcdError>>, MvccError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let result = {
            // Write-locked for the whole batch: the writer updates the index as it goes, and
            // lease readers wait for the commit rather than see uncommitted attachments.
            let mut leases = self.leases.write().unwrap_or_else(|e| e.into_inner());
            let mut index = self.index_mut();
            let result = self.apply_batch(batch, raft_meta, durable, &mut leases, &mut index);
            if result.is_err() {
                // Nothing of the batch was committed, but the indexes may hold some of it.
                if let Err(e) = self.reload_indexes(&mut leases, &mut index) {
                    tracing::error!(error = %e, "rebuilding the indexes after a failed batch");
                }
            }
            result
        }?;
        if durable {
            // The fsync comes after the indexes are released: it writes every page dirtied since
            // the last durable commit (hundreds of milliseconds under big values), and readers
            // must not wait for it, nor hold a runtime worker meanwhile (bug 14 in
            // docs/robustness.md). Only the next batch waits, on `writing`.
            self.db.sync()?;
        }
        Ok(result)
    }

    fn apply_batch(
        &self,
        batch: &[Option<&Command>],
        raft_meta: &[u8],
        durable: bool,
        leases: &mut lease::LeaseIndex,
        index: &mut KeyIndex,
    ) -> Result<Vec<Result<Applied, EtcdError>>, MvccError> {
        // Held until the batch is committed or parked: a reader that needs the parked writes
        // waits here instead of reading without them.
        let mut slot = self.db.parked()?;
        let parked = slot.take();
        let (txn, since) = match parked {
            Some(p) => (p.txn, p.since),
            None => (self.db.shared().begin_write()?, Instant::now()),
        };
        let written = Self::write_batch(&txn, batch, raft_meta, leases, index);
        let (results, current, compact) = match written {
            Ok(w) => w,
            Err(e) => {
                // The transaction holds this batch half-applied and every parked batch with it.
                drop(txn);
                self.db.fail();
                return Err(e);
            }
        };
        if durable || since.elapsed() >= COMMIT_INTERVAL {
            // Without fsync even when durable: `apply` syncs once the indexes are released.
            self.db.commit(txn, false)?;
        } else {
            self.db.park(&mut slot, maintenance::Parked { txn, since });
        }
        self.current_rev.store(current, Ordering::Release);
        self.compact_rev.store(compact, Ordering::Release);
        Ok(results)
    }

    /// Applies `batch` and writes `raft_meta` inside `txn`; returns the results and the new
    /// current and compaction revisions.
    #[allow(clippy::type_complexity)]
    fn write_batch(
        txn: &redb::WriteTransaction,
        batch: &[Option<&Command>],
        raft_meta: &[u8],
        leases: &mut lease::LeaseIndex,
        index: &mut KeyIndex,
    ) -> Result<(Vec<Result<Applied, EtcdError>>, i64, i64), MvccError> {
        let mut meta = txn.open_table(META)?;
        let (rev, compact_rev) = read_meta_revs(&meta)?;
        let tables = write::Tables {
            kv: txn.open_table(KV_BY_REV)?,
            leases: txn.open_table(LEASES)?,
        };
        let mut writer = write::Writer {
            tables,
            leases,
            index,
            rev,
            compact_rev,
        };
        let mut results = Vec::with_capacity(batch.len());
        for cmd in batch.iter().flatten() {
            results.push(writer.apply(cmd)?);
        }
        assert!(
            writer.rev >= rev && writer.compact_rev <= writer.rev,
            "revisions went backwards"
        );
        meta.insert(META_CURRENT_REV, writer.rev.to_le_bytes().as_slice())?;
        meta.insert(
            META_COMPACT_REV,
            writer.compact_rev.to_le_bytes().as_slice(),
        )?;
        meta.insert(META_RAFT_META, raft_meta)?;
        Ok((results, writer.rev, writer.compact_rev))
    }

    /// The bytes last given to [`Mvcc::apply`] (or restored from a snapshot); None on a new store.
    pub fn raft_meta(&self) -> Result<Option<Vec<u8>>, MvccError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(META_RAFT_META)?.map(|v| v.value().to_vec()))
    }

    /// The newest revision (1 on an empty store).
    pub fn current_revision(&self) -> i64 {
        self.current_rev.load(Ordering::Acquire)
    }

    /// The revision of the last compaction; 0 if never compacted.
    pub fn compact_revision(&self) -> i64 {
        self.compact_rev.load(Ordering::Acquire).max(0)
    }

    /// Size of the database file.
    pub fn db_size_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Streams the whole state, `raft_meta` included, from one read transaction into `w`, in
    /// the versioned and checksummed format of [`SNAPSHOT_VERSION`].
    pub fn write_snapshot(&self, w: &mut dyn std::io::Write) -> Result<(), MvccError> {
        let txn = self.db.begin_read()?;
        snapshot::write(&txn, w)
    }

    /// A consistent read view of the whole state as of now, to be serialized later with
    /// [`SnapshotView::write`] (in the format of [`Mvcc::write_snapshot`]) while writes go on.
    /// Cheap to take; it keeps the pages of that state from being reused until it is dropped.
    pub fn snapshot_view(&self) -> Result<SnapshotView, MvccError> {
        Ok(SnapshotView { txn: self.db.begin_read()? })
    }

    /// Replaces the whole state with a snapshot from [`Mvcc::write_snapshot`], atomically: one
    /// write transaction clears and refills the tables and only commits once every chunk's
    /// checksum, the record count and the data format version have checked out. A rejected
    /// snapshot leaves the state untouched.
    pub fn restore_snapshot(&self, r: &mut dyn std::io::Read) -> Result<(), MvccError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut leases = self.leases.write().unwrap_or_else(|e| e.into_inner());
        let mut index = self.index_mut();
        // The snapshot replaces everything; nothing may stay parked across it.
        self.db.commit_parked()?;
        snapshot::restore(&self.db.shared(), r)?;
        self.reload_indexes(&mut leases, &mut index)?;
        let txn = self.db.begin_read()?;
        let (current, compact) = read_meta_revs(&txn.open_table(META)?)?;
        self.current_rev.store(current, Ordering::Release);
        self.compact_rev.store(compact, Ordering::Release);
        Ok(())
    }

    /// The changes after revision `after_rev`, in revision order, as watch events (`prev_kv`
    /// filled where it still exists, never on a create).
    ///
    /// Never splits a revision: returns at most `limit` events (0 = no limit), or the first
    /// revision's whole set if that alone is larger.
    ///
    /// A negative `after_rev` counts as 0. `Err(Compacted)` if `after_rev + 1` is below the
    /// compaction revision, like etcd's watch.
    /// As in etcd, the compaction revision itself is readable but incomplete: its deletes are
    /// gone and its puts lack `prev_kv`. A caller that needs every change (the backup
    /// archiver) should insist on `after_rev >= compact_revision()`.
    pub fn events_since(&self, after_rev: i64, limit: usize) -> Result<Vec<Event>, EtcdError> {
        self.read(|txn, index| {
            let (_, compact) = read_meta_revs(&txn.open_table(META)?)?;
            let after_rev = after_rev.max(0);
            if after_rev.saturating_add(1) < compact {
                return Err(EtcdError::Compacted.into());
            }
            let kv = txn.open_table(KV_BY_REV)?;
            let view = View {
                kv: &kv,
                index,
            };
            let start = Rev {
                main: after_rev.saturating_add(1),
                sub: 0,
            }
            .to_u128();
            let limit = if limit == 0 { usize::MAX } else { limit };
            let mut events = Vec::new();
            let mut pending: Vec<Event> = Vec::new();
            let mut pending_main = None;
            for entry in kv.range(start..)? {
                let (k, v) = entry?;
                let rev = Rev::from_u128(k.value());
                if pending_main != Some(rev.main) {
                    if !events.is_empty() && events.len() + pending.len() > limit {
                        return Ok(events);
                    }
                    events.append(&mut pending);
                    if events.len() >= limit {
                        return Ok(events);
                    }
                    pending_main = Some(rev.main);
                }
                pending.push(event_at(&view, &codec::decode_entry(v.value())?, rev)?);
            }
            if events.is_empty() || events.len() + pending.len() <= limit {
                events.append(&mut pending);
            }
            Ok(events)
        })
    }
}

/// The watch event of `entry`, stored at `rev`.
fn event_at<T: read::KvRead, I: read::IndexRead>(
    view: &View<'_, T, I>,
    entry: &codec::Entry<'_>,
    rev: Rev,
) -> Result<Event, MvccError> {
    let prev = || view.get_at(entry.key, rev.main - 1);
    Ok(match entry.key_value(rev.main) {
        None => Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: entry.key.to_vec(),
                mod_revision: rev.main,
                ..Default::default()
            }),
            prev_kv: prev()?,
        },
        Some(kv) => {
            let prev_kv = if kv.version == 1 { None } else { prev()? };
            Event {
                r#type: EventType::Put as i32,
                kv: Some(kv),
                prev_kv,
            }
        }
    })
}

/// Builds the key index and the lease index from one read view of the store. Lease numbers
/// continue after `lease_seq_after` (see `lease::LeaseIndex::load`).
fn load_indexes(
    txn: &redb::ReadTransaction,
    lease_seq_after: u64,
) -> Result<(KeyIndex, lease::LeaseIndex), MvccError> {
    let (_, compact) = read_meta_revs(&txn.open_table(META)?)?;
    let mut index = KeyIndex::new(compact);
    // The newest lease of every key that has one; revision order means later rows win.
    let mut leased: std::collections::BTreeMap<Vec<u8>, i64> = Default::default();
    for entry in txn.open_table(KV_BY_REV)?.iter()? {
        let (k, v) = entry?;
        let rev = Rev::from_u128(k.value());
        let e = codec::decode_entry(v.value())?;
        let put = e
            .put_meta()
            .map(|(create_revision, version, lease)| index::Newest {
                rev,
                create_revision,
                version,
                lease,
            });
        index.push(e.key, rev, put);
        match e.lease() {
            0 => {
                leased.remove(e.key);
            }
            lease => {
                leased.insert(e.key.to_vec(), lease);
            }
        }
    }
    let leases = lease::LeaseIndex::load(&txn.open_table(LEASES)?, leased, lease_seq_after)?;
    Ok((index, leases))
}

/// Rewrites a format 1 store as format 2 inside `txn`: every `kv` row becomes a `kv_by_rev` row,
/// and the `kv` and `revs` tables go. The caller commits (or drops) the transaction.
fn migrate_v1(
    txn: &redb::WriteTransaction,
    meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
) -> Result<(), MvccError> {
    {
        let old = txn.open_table(KV_V1)?;
        let mut new = txn.open_table(KV_BY_REV)?;
        for entry in old.iter()? {
            let (k, v) = entry?;
            let (key, rev) = codec::split_kv_key(k.value())?;
            let record = Record::decode(v.value())?;
            new.insert(rev.to_u128(), codec::encode_entry(key, &record).as_slice())?;
        }
    }
    txn.delete_table(KV_V1)?;
    txn.delete_table(REVS_V1)?;
    meta.insert(META_FORMAT_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
    Ok(())
}
