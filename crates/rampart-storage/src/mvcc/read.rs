//! Reading the multi-version `kv` table: one key or a key range as of a revision, and etcd's
//! Range request on top (limit, count, sort, filters), as `etcdserver/apply.go` does it.
//!
//! Everything here is generic over [`redb::ReadableTable`] so that the same code serves reads
//! from a read transaction and reads inside a write transaction (a txn sees its own writes).

use std::cmp::Ordering;
use std::ops::Bound;

use rampart_core::EtcdError;
use rampart_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use rampart_proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use rampart_proto::mvccpb::KeyValue;
use redb::{AccessGuard, ReadableTable};

use super::codec::{self, KvKey, Record, Rev};
use super::{Fail, MvccError};

/// Any view of the `kv` table.
pub(crate) trait KvRead: ReadableTable<KvKey, &'static [u8]> {}
impl<T: ReadableTable<KvKey, &'static [u8]>> KvRead for T {}

/// "As of the newest revision": also sees the writes of the txn being applied.
pub(crate) const LATEST: i64 = i64::MAX;

/// After this many visible versions of one key, a scan stops stepping through them one by one
/// and seeks to the newest instead, so a key rewritten a million times costs two seeks.
const SEQUENTIAL_VERSIONS: usize = 8;

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

/// A stored `kv` value, still in the table's page.
type Stored<'t> = AccessGuard<'t, &'static [u8]>;

/// The newest version of `key` with main revision <= `at`, tombstones included.
pub(crate) fn newest<'t, T: KvRead>(
    kv: &'t T,
    key: &[u8],
    at: i64,
) -> Result<Option<(Rev, Stored<'t>)>, MvccError> {
    let lo = codec::kv_key_first(key);
    let hi = codec::kv_key_raw(key, at.max(0) as u64, u64::MAX);
    match kv
        .range::<&[u8]>(lo.as_slice()..=hi.as_slice())?
        .next_back()
    {
        None => Ok(None),
        Some(entry) => {
            let (k, v) = entry?;
            let (_, rev) = codec::split_kv_key(k.value())?;
            Ok(Some((rev, v)))
        }
    }
}

/// `key` as of main revision `at`; None if it did not exist then.
pub(crate) fn get_at<T: KvRead>(
    kv: &T,
    key: &[u8],
    at: i64,
) -> Result<Option<KeyValue>, MvccError> {
    match newest(kv, key, at)? {
        None => Ok(None),
        Some((rev, v)) => Ok(Record::decode(v.value())?.into_key_value(key, rev.main)),
    }
}

/// Live keys of a span at one revision: how many there are, and the first few in key order.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub kvs: Vec<KeyValue>,
    pub count: i64,
}

struct Collector {
    scan: Scan,
    /// How many key-values to decode and keep; `usize::MAX` for all.
    keep: usize,
}

impl Collector {
    fn add(&mut self, key: &[u8], rev: Rev, raw: &[u8]) -> Result<(), MvccError> {
        if codec::is_tombstone(raw)? {
            return Ok(());
        }
        self.scan.count += 1;
        if self.scan.kvs.len() < self.keep {
            let kv = Record::decode(raw)?
                .into_key_value(key, rev.main)
                .expect("not a tombstone");
            self.scan.kvs.push(kv);
        }
        Ok(())
    }
}

/// Counts the live keys of `span` as of main revision `at` and returns the first `keep` of them
/// (in key order) in full.
pub(crate) fn range_at<T: KvRead>(
    kv: &T,
    span: Span,
    at: i64,
    keep: usize,
) -> Result<Scan, MvccError> {
    let mut out = Collector {
        scan: Scan::default(),
        keep,
    };
    let (start, end) = match span {
        Span::Single(key) => {
            if let Some((rev, v)) = newest(kv, key, at)? {
                out.add(key, rev, v.value())?;
            }
            return Ok(out.scan);
        }
        Span::From(key) => (key, Bound::Unbounded),
        Span::Until(key, end) if end <= key => return Ok(out.scan),
        Span::Until(key, end) => (key, Bound::Excluded(codec::kv_key_first(end))),
    };
    let end = end.as_ref().map(Vec::as_slice);

    // Walk the versions in key order. For each user key the last version with main <= `at`
    // decides whether it exists; later versions are skipped with a seek.
    let mut lower = Bound::Included(codec::kv_key_first(start));
    'seek: loop {
        let mut iter = kv.range::<&[u8]>((lower.as_ref().map(Vec::as_slice), end))?;
        let mut current: Option<(Vec<u8>, Rev, Stored<'_>)> = None;
        let mut versions = 0;
        loop {
            let Some(entry) = iter.next() else {
                if let Some((key, rev, v)) = current.take() {
                    out.add(&key, rev, v.value())?;
                }
                break 'seek;
            };
            let (k, v) = entry?;
            let (key, rev) = codec::split_kv_key(k.value())?;
            if current
                .as_ref()
                .is_some_and(|(cur, _, _)| cur.as_slice() != key)
            {
                let (cur, cur_rev, cur_v) = current.take().expect("checked");
                out.add(&cur, cur_rev, cur_v.value())?;
                versions = 0;
            }
            if rev.main > at {
                // Everything after this version of `key` is newer still.
                if let Some((cur, cur_rev, cur_v)) = current.take() {
                    out.add(&cur, cur_rev, cur_v.value())?;
                }
                lower = Bound::Excluded(codec::kv_key_last(key));
                continue 'seek;
            }
            versions += 1;
            if versions > SEQUENTIAL_VERSIONS {
                if let Some((rev, v)) = newest(kv, key, at)? {
                    out.add(key, rev, v.value())?;
                }
                lower = Bound::Excluded(codec::kv_key_last(key));
                continue 'seek;
            }
            current = Some((key.to_vec(), rev, v));
        }
    }
    Ok(out.scan)
}

/// etcd's Range at a read view whose newest revision is `cur_rev` (`apply.go` `Range` plus
/// `kvstore_txn.go` `rangeKeys`). `compact_rev` is -1 if the store was never compacted. The
/// request must have been validated ([`super::validate::range`]).
pub(crate) fn range_request<T: KvRead>(
    kv: &T,
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
    let Scan { mut kvs, count } = range_at(kv, Span::new(&req.key, &req.range_end), rev, keep)?;

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
