//! The key index: for every user key, the revisions at which it was written or deleted, in
//! memory (etcd's `treeIndex`). The `kv_by_rev` table is ordered by revision only, so this is
//! what finds a key's version as of a revision, and what a range walks in key order.
//!
//! Derived data: rebuilt from `kv_by_rev` when the store opens and after a snapshot is restored,
//! and kept current by every write. The writer holds it exclusively for a whole batch and
//! pushes each version as it writes it, so a txn sees its own writes. Readers take it shared
//! only to look revisions up, then read the versions from their own redb read transaction.
//!
//! A reader's transaction may be older than the index: versions newer than the reader's revision
//! are simply not asked for, but versions a later compaction removed would be missing. So the
//! index carries the compaction revision it has applied ([`KeyIndex::compacted`]), and a read
//! below it is refused as compacted, as etcd refuses it.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;

use super::codec::Rev;
use super::read::Span;

/// One stored version of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    pub rev: Rev,
    pub tombstone: bool,
}

/// What a put needs to know of a key's newest version when it is live, so that it need not read
/// the version itself (etcd's keyIndex keeps `created` and `ver` for the same reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Newest {
    pub rev: Rev,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

#[derive(Debug)]
struct Key {
    /// Oldest first, never empty.
    versions: Vec<Version>,
    /// Of the newest version, if it is a put.
    newest: Option<Newest>,
}

/// Keys up to this long are stored inside the index's B-tree nodes.
const INLINE_KEY_BYTES: usize = 22;

/// A key as the index holds it: short keys inline, so that a lookup compares bytes already in the
/// node it is reading instead of following a pointer per comparison (that was 3–4% of a
/// follower's CPU under put-64), and costs no allocation of its own; longer keys on the heap.
#[derive(Clone)]
enum IndexKey {
    Inline { len: u8, bytes: [u8; INLINE_KEY_BYTES] },
    Heap(Box<[u8]>),
}

impl IndexKey {
    fn new(key: &[u8]) -> IndexKey {
        if key.len() <= INLINE_KEY_BYTES {
            let mut bytes = [0u8; INLINE_KEY_BYTES];
            bytes[..key.len()].copy_from_slice(key);
            IndexKey::Inline { len: key.len() as u8, bytes }
        } else {
            IndexKey::Heap(key.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            IndexKey::Inline { len, bytes } => &bytes[..*len as usize],
            IndexKey::Heap(b) => b,
        }
    }
}

// Equality and order are those of the bytes, as `Borrow<[u8]>` requires.
impl PartialEq for IndexKey {
    fn eq(&self, other: &IndexKey) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for IndexKey {}
impl PartialOrd for IndexKey {
    fn partial_cmp(&self, other: &IndexKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for IndexKey {
    fn cmp(&self, other: &IndexKey) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}
impl Borrow<[u8]> for IndexKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// Every key with its stored versions.
#[derive(Debug)]
pub(crate) struct KeyIndex {
    keys: BTreeMap<IndexKey, Key>,
    /// The compaction revision applied to the index, -1 if none (etcd's `compactMainRev`).
    compacted: i64,
}

/// The live keys of a span at one revision: how many, and the first few with their revisions.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub first: Vec<(Vec<u8>, Rev)>,
    pub count: i64,
}

impl KeyIndex {
    pub fn new(compacted: i64) -> KeyIndex {
        KeyIndex {
            keys: BTreeMap::new(),
            compacted,
        }
    }

    pub fn compacted(&self) -> i64 {
        self.compacted
    }

    /// Records a new version of `key`: a put (with what [`KeyIndex::current`] will answer) or,
    /// with `put` None, a tombstone. Versions must come in revision order.
    pub fn push(&mut self, key: &[u8], rev: Rev, put: Option<Newest>) {
        debug_assert!(put.is_none_or(|p| p.rev == rev));
        let version = Version {
            rev,
            tombstone: put.is_none(),
        };
        match self.keys.get_mut(key) {
            Some(k) => {
                debug_assert!(k.versions.last().is_none_or(|v| v.rev < rev));
                k.versions.push(version);
                k.newest = put;
            }
            None => {
                self.keys.insert(
                    IndexKey::new(key),
                    Key {
                        versions: vec![version],
                        newest: put,
                    },
                );
            }
        }
    }

    /// The newest version of `key` with main revision <= `at`, tombstones included.
    pub fn newest(&self, key: &[u8], at: i64) -> Option<Version> {
        newest_of(&self.keys.get(key)?.versions, at)
    }

    /// The newest version of `key` if it exists now (is not deleted).
    pub fn current(&self, key: &[u8]) -> Option<Newest> {
        self.keys.get(key)?.newest
    }

    /// The live keys of `span` as of main revision `at`: all of them counted, the first `keep`
    /// (in key order) returned with the revision of their version.
    pub fn live(&self, span: Span, at: i64, keep: usize) -> Live {
        let mut live = Live::default();
        let mut add = |key: &[u8], k: &Key| {
            if let Some(v) = newest_of(&k.versions, at).filter(|v| !v.tombstone) {
                live.count += 1;
                if live.first.len() < keep {
                    live.first.push((key.to_vec(), v.rev));
                }
            }
        };
        let (start, end) = match span {
            Span::Single(key) => {
                if let Some((key, k)) = self.keys.get_key_value(key) {
                    add(key.as_bytes(), k);
                }
                return live;
            }
            Span::From(key) => (key, Bound::Unbounded),
            Span::Until(key, end) if end <= key => return live,
            Span::Until(key, end) => (key, Bound::Excluded(end)),
        };
        for (key, k) in self
            .keys
            .range::<[u8], _>((Bound::Included(start), end))
        {
            add(key.as_bytes(), k);
        }
        live
    }

    /// Drops the versions of `key` that no read at or after `upto` can see: every version up to
    /// `upto` but the newest, and that one too if it is a tombstone (etcd's `keyIndex.compact`).
    /// Returns the revisions dropped, for the caller to delete from `kv_by_rev`.
    pub fn compact_key(&mut self, key: &[u8], upto: i64) -> Vec<Rev> {
        let Some(Key { versions, .. }) = self.keys.get_mut(key) else {
            return Vec::new();
        };
        let visible = versions.partition_point(|v| v.rev.main <= upto);
        let keep_newest = visible > 0 && !versions[visible - 1].tombstone;
        let drop = visible - usize::from(keep_newest);
        let dropped = versions.drain(..drop).map(|v| v.rev).collect();
        if versions.is_empty() {
            self.keys.remove(key);
        }
        dropped
    }

    /// Marks compaction at `upto` as applied: reads below it are refused from now on.
    pub fn set_compacted(&mut self, upto: i64) {
        self.compacted = self.compacted.max(upto);
    }

    /// How many keys the index holds (live or deleted but not compacted away).
    #[cfg(test)]
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

fn newest_of(versions: &[Version], at: i64) -> Option<Version> {
    // Most reads are of the newest version: check it before searching.
    match versions.last() {
        Some(v) if v.rev.main <= at => Some(*v),
        _ => {
            let i = versions.partition_point(|v| v.rev.main <= at);
            i.checked_sub(1).map(|i| versions[i])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(main: i64, sub: i64, tombstone: bool) -> Version {
        Version {
            rev: Rev { main, sub },
            tombstone,
        }
    }

    fn push(ix: &mut KeyIndex, key: &[u8], v: Version) {
        let put = (!v.tombstone).then_some(Newest {
            rev: v.rev,
            create_revision: 1,
            version: v.rev.main,
            lease: 0,
        });
        ix.push(key, v.rev, put);
    }

    #[test]
    fn newest_live_and_compaction() {
        let mut ix = KeyIndex::new(-1);
        push(&mut ix, b"a", v(2, 0, false));
        push(&mut ix, b"b", v(3, 0, false));
        push(&mut ix, b"a", v(4, 0, false));
        assert_eq!(ix.current(b"a").map(|n| n.version), Some(4));
        push(&mut ix, b"a", v(5, 0, true));
        push(&mut ix, b"a\0", v(5, 1, false));
        assert_eq!(ix.current(b"a"), None);
        assert_eq!(ix.current(b"b").map(|n| n.rev.main), Some(3));
        assert_eq!(ix.newest(b"a", 1), None);
        assert_eq!(ix.newest(b"a", 3), Some(v(2, 0, false)));
        assert_eq!(ix.newest(b"a", 4), Some(v(4, 0, false)));
        assert_eq!(ix.newest(b"a", i64::MAX), Some(v(5, 0, true)));
        let names = |l: Live| (l.count, l.first.into_iter().map(|(k, r)| (k, r.main)).collect::<Vec<_>>());
        assert_eq!(
            names(ix.live(Span::From(b"a"), 4, usize::MAX)),
            (2, vec![(b"a".to_vec(), 4), (b"b".to_vec(), 3)])
        );
        assert_eq!(
            names(ix.live(Span::From(b"a"), 5, 1)),
            (2, vec![(b"a\0".to_vec(), 5)])
        );
        assert_eq!(names(ix.live(Span::Until(b"a", b"b"), 5, 9)).0, 1);
        assert_eq!(names(ix.live(Span::Until(b"b", b"a"), 5, 9)).0, 0);
        assert_eq!(names(ix.live(Span::Single(b"a"), 4, 0)), (1, vec![]));

        // Compacting at 4 keeps a's version 4 (still visible at 4); at 5 the tombstone takes
        // the key away entirely.
        assert_eq!(ix.compact_key(b"a", 4), vec![Rev { main: 2, sub: 0 }]);
        assert_eq!(ix.newest(b"a", 4), Some(v(4, 0, false)));
        assert_eq!(
            ix.compact_key(b"a", 5),
            vec![Rev { main: 4, sub: 0 }, Rev { main: 5, sub: 0 }]
        );
        assert_eq!(ix.newest(b"a", i64::MAX), None);
        assert_eq!(ix.compact_key(b"b", 5), vec![]);
        assert_eq!(ix.key_count(), 2);
    }

    #[test]
    fn inline_and_heap_keys_order_as_their_bytes() {
        let long = |c: u8| vec![c; INLINE_KEY_BYTES + 1];
        let keys: Vec<Vec<u8>> = vec![b"b".to_vec(), long(b'a'), b"a".to_vec(), long(b'b'), vec![b'a'; INLINE_KEY_BYTES], vec![]];
        let mut ix = KeyIndex::new(-1);
        for (i, k) in keys.iter().enumerate() {
            push(&mut ix, k, v(i as i64 + 2, 0, false));
        }
        let mut want = keys.clone();
        want.sort();
        let live = ix.live(Span::From(b""), i64::MAX, usize::MAX);
        assert_eq!(live.first.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), want);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(ix.newest(k, i64::MAX).map(|v| v.rev.main), Some(i as i64 + 2));
        }
        assert_eq!(ix.newest(&long(b'c'), i64::MAX), None);
    }
}
