//! Reading the multi-version store: one key or a key range as of a revision, and etcd's Range
//! request on top (limit, count, sort, filters), as `etcdserver/apply.go` does it. The key index
//! finds the versions, the `kv_by_rev` table holds them.
//!
//! Everything here is generic over [`redb::ReadableTable`] so that the same code serves reads
//! from a read transaction and reads inside a write transaction (a txn sees its own writes).

use std::cmp::Ordering;
use std::sync::{PoisonError, RwLock};

use rampart_core::EtcdError;
use rampart_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use rampart_proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use rampart_proto::mvccpb::KeyValue;
use redb::ReadableTable;

use super::codec::{self, Rev};
use super::index::{KeyIndex, Live, Version};
use super::{Fail, MvccError};

/// Any view of the `kv_by_rev` table.
pub(crate) trait KvRead: ReadableTable<u128, &'static [u8]> {}
impl<T: ReadableTable<u128, &'static [u8]>> KvRead for T {}

/// The key index, held (the writer has it for its whole batch) or to be locked for each lookup.
pub(crate) trait IndexRead {
    fn with<R>(&self, f: impl FnOnce(&KeyIndex) -> R) -> R;
}

impl IndexRead for KeyIndex {
    fn with<R>(&self, f: impl FnOnce(&KeyIndex) -> R) -> R {
        f(self)
    }
}

/// The index as a reader has it: locked for each lookup, or held for a whole read.
pub(crate) enum IndexAccess<'a> {
    Shared(&'a RwLock<KeyIndex>),
    Held(&'a KeyIndex),
}

impl IndexRead for IndexAccess<'_> {
    fn with<R>(&self, f: impl FnOnce(&KeyIndex) -> R) -> R {
        match self {
            IndexAccess::Shared(lock) => f(&lock.read().unwrap_or_else(PoisonError::into_inner)),
            IndexAccess::Held(index) => f(index),
        }
    }
}

/// What reads need: one transaction's `kv_by_rev` table, and the key index to find versions in it.
pub(crate) struct View<'a, T, I> {
    pub kv: &'a T,
    pub index: &'a I,
}

/// "As of the newest revision": also sees the writes of the txn being applied.
pub(crate) const LATEST: i64 = i64::MAX;

/// Which keys a request names, from its `key` and `range_end` (etcd's `mkGteRange` rules).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Span<'a> {
    /// Empty `range_end`: just `key`.
    Single(&'a [u8]),
    /// `range_end` is one zero byte: every key >= `key`.
    From(&'a [u8]),
    /// `[key, range_end)`; empty when `range_end <= key`.
    Until(&'a [u8], &'a [u8]),
}

impl<'a> Span<'a> {
    pub fn new(key: &'a [u8], range_end: &'a [u8]) -> Span<'a> {
        match range_end {
            [] => Span::Single(key),
            [0] => Span::From(key),
            end => Span::Until(key, end),
        }
    }
}

/// Live keys of a span at one revision: how many there are, and the first few in key order.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub kvs: Vec<KeyValue>,
    pub count: i64,
}

impl<T: KvRead, I: IndexRead> View<'_, T, I> {
    /// The newest version of `key` with main revision <= `at`, tombstones included.
    pub fn newest(&self, key: &[u8], at: i64) -> Option<Version> {
        self.index.with(|ix| ix.newest(key, at))
    }

    /// The compaction revision the index has applied; reads below it may miss versions.
    pub fn compacted(&self) -> i64 {
        self.index.with(KeyIndex::compacted)
    }

    /// The stored version of `key` at `rev`, which the index says exists.
    pub fn stored(&self, key: &[u8], rev: Rev) -> Result<KeyValue, MvccError> {
        let raw = self.kv.get(rev.to_u128())?.ok_or_else(|| {
            MvccError::Corrupt(format!(
                "revision {}/{} of key {:?} is indexed but not stored",
                rev.main,
                rev.sub,
                String::from_utf8_lossy(key)
            ))
        })?;
        let entry = codec::decode_entry(raw.value())?;
        if entry.key != key {
            return Err(MvccError::Corrupt(format!(
                "revision {}/{} holds key {:?}, the index says {:?}",
                rev.main,
                rev.sub,
                String::from_utf8_lossy(entry.key),
                String::from_utf8_lossy(key)
            )));
        }
        entry.key_value(rev.main).ok_or_else(|| {
            MvccError::Corrupt(format!(
                "revision {}/{} is indexed as a put but stored as a tombstone",
                rev.main, rev.sub
            ))
        })
    }

    /// `key` as of main revision `at`; None if it did not exist then.
    pub fn get_at(&self, key: &[u8], at: i64) -> Result<Option<KeyValue>, MvccError> {
        match self.newest(key, at) {
            Some(v) if !v.tombstone => Ok(Some(self.stored(key, v.rev)?)),
            _ => Ok(None),
        }
    }

    /// Counts the live keys of `span` as of main revision `at` and returns the first `keep` of
    /// them (in key order) in full.
    pub fn range_at(&self, span: Span, at: i64, keep: usize) -> Result<Scan, MvccError> {
        let Live { first, count } = self.index.with(|ix| ix.live(span, at, keep));
        let kvs = first
            .iter()
            .map(|(key, rev)| self.stored(key, *rev))
            .collect::<Result<_, _>>()?;
        Ok(Scan { kvs, count })
    }
}

/// etcd's Range at a read view whose newest revision is `cur_rev` (`apply.go` `Range` plus
/// `kvstore_txn.go` `rangeKeys`). `compact_rev` is -1 if the store was never compacted. The
/// request must have been validated ([`super::validate::range`]).
pub(crate) fn range_request<T: KvRead, I: IndexRead>(
    view: &View<'_, T, I>,
    req: &RangeRequest,
    cur_rev: i64,
    compact_rev: i64,
) -> Result<RangeResponse, Fail> {
    let sort_target = SortTarget::try_from(req.sort_target).map_err(|_| {
        // Validation rejects this first; etcd 3.4 would crash on it.
        EtcdError::InvalidArgument(format!("invalid sort_target {}", req.sort_target))
    })?;
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    // Sorting and filtering need every key; otherwise one extra key tells whether there is more.
    let keep = if req.sort_order != SortOrder::None as i32 || filtered || req.limit <= 0 {
        usize::MAX
    } else {
        usize::try_from(req.limit)
            .unwrap_or(usize::MAX)
            .saturating_add(1)
    };

    if req.revision > cur_rev {
        return Err(EtcdError::FutureRev.into());
    }
    let rev = if req.revision <= 0 {
        cur_rev
    } else {
        req.revision
    };
    if rev < compact_rev {
        return Err(EtcdError::Compacted.into());
    }

    let keep = if req.count_only { 0 } else { keep };
    let Scan { mut kvs, count } = view.range_at(Span::new(&req.key, &req.range_end), rev, keep)?;
    // A compaction applied while this read ran may have taken versions it needed.
    if rev < view.compacted() {
        return Err(EtcdError::Compacted.into());
    }

    // Filters drop key-values but leave `count` as it was, as etcd does.
    kvs.retain(|kv| {
        !(req.max_mod_revision != 0 && kv.mod_revision > req.max_mod_revision
            || req.min_mod_revision != 0 && kv.mod_revision < req.min_mod_revision
            || req.max_create_revision != 0 && kv.create_revision > req.max_create_revision
            || req.min_create_revision != 0 && kv.create_revision < req.min_create_revision)
    });

    // A non-key target without an order means ascending. An unknown order sorts nothing (etcd
    // 3.4 does the same). Sorting is stable, so ties keep key order, like etcd's insertion sort
    // on small results.
    let mut order = req.sort_order;
    if sort_target != SortTarget::Key && order == SortOrder::None as i32 {
        order = SortOrder::Ascend as i32;
    }
    let by = |a: &KeyValue, b: &KeyValue| -> Ordering {
        match sort_target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        }
    };
    if order == SortOrder::Ascend as i32 {
        kvs.sort_by(by);
    } else if order == SortOrder::Descend as i32 {
        kvs.sort_by(|a, b| by(b, a));
    }

    let mut more = false;
    if req.limit > 0 && kvs.len() as u64 > req.limit as u64 {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value = Vec::new();
        }
    }
    Ok(RangeResponse {
        header: Some(header(cur_rev)),
        kvs,
        more,
        count,
    })
}

/// A response header with only the revision filled; the caller fills the rest.
pub(crate) fn header(revision: i64) -> ResponseHeader {
    ResponseHeader {
        revision,
        ..Default::default()
    }
}
