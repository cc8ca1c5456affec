//! How keys and values are laid out in the redb tables.
//!
//! Every stored value starts with a record-format byte so that a later format can be read next to
//! this one. The key layouts are fixed by [`super::FORMAT_VERSION`].

use std::cmp::Ordering;

use rampart_proto::mvccpb::KeyValue;
use redb::{Key, TypeName, Value};

use super::MvccError;

/// First byte of every value in the `kv` and `revs` tables.
pub(crate) const RECORD_V1: u8 = 1;

const KIND_PUT: u8 = 0;
const KIND_TOMBSTONE: u8 = 1;

/// Width of the revision suffix of a [`KvKey`]: big-endian main and sub revision.
const REV_SUFFIX: usize = 16;

/// A revision as etcd has it: `main` is the cluster-wide revision, `sub` orders the changes made
/// by one request (a txn writes several keys at one main revision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rev {
    pub main: i64,
    pub sub: i64,
}

impl Rev {
    /// The key of the `revs` table: main in the high half, so numeric order is revision order.
    pub fn to_u128(self) -> u128 {
        debug_assert!(self.main >= 0 && self.sub >= 0);
        ((self.main as u64 as u128) << 64) | self.sub as u64 as u128
    }

    pub fn from_u128(v: u128) -> Rev {
        Rev {
            main: (v >> 64) as u64 as i64,
            sub: v as u64 as i64,
        }
    }
}

/// Key type of the `kv` table: `user_key ++ be(main) ++ be(sub)`, ordered by user key first and
/// revision second. Plain byte order would not do: `"a" ++ rev` and `"a\0" ++ rev` interleave,
/// so the comparison splits off the fixed-width suffix before comparing the user keys.
#[derive(Debug)]
pub(crate) enum KvKey {}

impl Value for KvKey {
    type SelfType<'a>
        = &'a [u8]
    where
        Self: 'a;
    type AsBytes<'a>
        = &'a [u8]
    where
        Self: 'a;

    fn fixed_width() -> Option<usize> {
        None
    }

    fn from_bytes<'a>(data: &'a [u8]) -> &'a [u8]
    where
        Self: 'a,
    {
        data
    }

    fn as_bytes<'a, 'b: 'a>(value: &'a &'b [u8]) -> &'a [u8]
    where
        Self: 'b,
    {
        value
    }

    fn type_name() -> TypeName {
        TypeName::new("rampart::mvcc::KvKey")
    }
}

impl Key for KvKey {
    fn compare(data1: &[u8], data2: &[u8]) -> Ordering {
        // Only our own encodings reach the table, and each is at least REV_SUFFIX long; the
        // saturating split keeps a malformed key from panicking inside redb all the same.
        let (k1, r1) = data1.split_at(data1.len().saturating_sub(REV_SUFFIX));
        let (k2, r2) = data2.split_at(data2.len().saturating_sub(REV_SUFFIX));
        k1.cmp(k2).then_with(|| r1.cmp(r2))
    }
}

/// Encodes a `kv` table key. Revisions are never negative in storage.
pub(crate) fn kv_key(user_key: &[u8], rev: Rev) -> Vec<u8> {
    kv_key_raw(user_key, rev.main as u64, rev.sub as u64)
}

/// Like [`kv_key`] but with raw bounds, for `u64::MAX` "after every revision" keys.
pub(crate) fn kv_key_raw(user_key: &[u8], main: u64, sub: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(user_key.len() + REV_SUFFIX);
    k.extend_from_slice(user_key);
    k.extend_from_slice(&main.to_be_bytes());
    k.extend_from_slice(&sub.to_be_bytes());
    k
}

/// Smallest `kv` key of `user_key`.
pub(crate) fn kv_key_first(user_key: &[u8]) -> Vec<u8> {
    kv_key_raw(user_key, 0, 0)
}

/// Largest possible `kv` key of `user_key`.
pub(crate) fn kv_key_last(user_key: &[u8]) -> Vec<u8> {
    kv_key_raw(user_key, u64::MAX, u64::MAX)
}

/// Splits a `kv` table key into user key and revision.
pub(crate) fn split_kv_key(k: &[u8]) -> Result<(&[u8], Rev), MvccError> {
    if k.len() <= REV_SUFFIX {
        return Err(MvccError::Corrupt(format!(
            "kv key of {} bytes is too short",
            k.len()
        )));
    }
    let (user, rev) = k.split_at(k.len() - REV_SUFFIX);
    let main = u64::from_be_bytes(rev[..8].try_into().expect("8 bytes"));
    let sub = u64::from_be_bytes(rev[8..].try_into().expect("8 bytes"));
    if main > i64::MAX as u64 || sub > i64::MAX as u64 {
        return Err(MvccError::Corrupt(format!(
            "kv key has revision {main}/{sub} out of range"
        )));
    }
    Ok((
        user,
        Rev {
            main: main as i64,
            sub: sub as i64,
        },
    ))
}

/// What a `kv` entry holds: a live version of the key, or the tombstone of a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Put {
        create_revision: i64,
        version: i64,
        lease: i64,
        value: Vec<u8>,
    },
    Tombstone,
}

impl Record {
    /// Layout v1: `[RECORD_V1, kind]`, then for a put `be(create) be(version) be(lease) value`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::Tombstone => vec![RECORD_V1, KIND_TOMBSTONE],
            Record::Put {
                create_revision,
                version,
                lease,
                value,
            } => {
                let mut v = Vec::with_capacity(2 + 24 + value.len());
                v.push(RECORD_V1);
                v.push(KIND_PUT);
                v.extend_from_slice(&create_revision.to_be_bytes());
                v.extend_from_slice(&version.to_be_bytes());
                v.extend_from_slice(&lease.to_be_bytes());
                v.extend_from_slice(value);
                v
            }
        }
    }

    pub fn decode(v: &[u8]) -> Result<Record, MvccError> {
        if is_tombstone(v)? {
            return Ok(Record::Tombstone);
        }
        if v.len() < 26 {
            return Err(MvccError::Corrupt(format!(
                "kv record of {} bytes is too short",
                v.len()
            )));
        }
        let int = |at: usize| i64::from_be_bytes(v[at..at + 8].try_into().expect("8 bytes"));
        Ok(Record::Put {
            create_revision: int(2),
            version: int(10),
            lease: int(18),
            value: v[26..].to_vec(),
        })
    }

    /// The record as etcd's KeyValue, given where it is stored. None for a tombstone.
    pub fn into_key_value(self, key: &[u8], mod_revision: i64) -> Option<KeyValue> {
        match self {
            Record::Tombstone => None,
            Record::Put {
                create_revision,
                version,
                lease,
                value,
            } => Some(KeyValue {
                key: key.to_vec(),
                create_revision,
                mod_revision,
                version,
                value,
                lease,
            }),
        }
    }
}

/// Reads only the kind byte: counting keys does not need to copy their values.
pub(crate) fn is_tombstone(v: &[u8]) -> Result<bool, MvccError> {
    match v {
        [RECORD_V1, KIND_TOMBSTONE] => Ok(true),
        [RECORD_V1, KIND_PUT, ..] => Ok(false),
        [RECORD_V1, kind, ..] => Err(MvccError::Corrupt(format!("unknown kv record kind {kind}"))),
        [version, ..] => Err(MvccError::Corrupt(format!(
            "unknown kv record version {version}"
        ))),
        [] => Err(MvccError::Corrupt("empty kv record".into())),
    }
}

/// Value of the `revs` table: which user key changed at a revision.
pub(crate) fn encode_rev_value(user_key: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + user_key.len());
    v.push(RECORD_V1);
    v.extend_from_slice(user_key);
    v
}

pub(crate) fn decode_rev_value(v: &[u8]) -> Result<&[u8], MvccError> {
    match v {
        [RECORD_V1, key @ ..] if !key.is_empty() => Ok(key),
        [RECORD_V1] => Err(MvccError::Corrupt("revs record without a key".into())),
        [version, ..] => Err(MvccError::Corrupt(format!(
            "unknown revs record version {version}"
        ))),
        [] => Err(MvccError::Corrupt("empty revs record".into())),
    }
}

/// Meta table values are plain little-endian integers; their layout is fixed by the file's
/// format version.
pub(crate) fn decode_i64(name: &str, v: &[u8]) -> Result<i64, MvccError> {
    v.try_into()
        .map(i64::from_le_bytes)
        .map_err(|_| MvccError::Corrupt(format!("meta {name} has {} bytes, want 8", v.len())))
}

pub(crate) fn decode_u32(name: &str, v: &[u8]) -> Result<u32, MvccError> {
    v.try_into()
        .map(u32::from_le_bytes)
        .map_err(|_| MvccError::Corrupt(format!("meta {name} has {} bytes, want 4", v.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_key_orders_by_user_key_then_revision() {
        let r = |main, sub| Rev { main, sub };
        let mut keys = [
            kv_key(b"a\0", r(1, 0)),
            kv_key(b"a", r(300, 0)),
            kv_key(b"b", r(1, 0)),
            kv_key(b"a", r(2, 1)),
            kv_key(b"a", r(2, 0)),
        ];
        keys.sort_by(|x, y| KvKey::compare(x, y));
        let split: Vec<_> = keys.iter().map(|k| split_kv_key(k).unwrap()).collect();
        assert_eq!(
            split,
            vec![
                (&b"a"[..], r(2, 0)),
                (&b"a"[..], r(2, 1)),
                (&b"a"[..], r(300, 0)),
                (&b"a\0"[..], r(1, 0)),
                (&b"b"[..], r(1, 0)),
            ]
        );
    }

    #[test]
    fn record_roundtrip() {
        for rec in [
            Record::Tombstone,
            Record::Put {
                create_revision: 2,
                version: 3,
                lease: -1,
                value: b"v".to_vec(),
            },
            Record::Put {
                create_revision: 5,
                version: 1,
                lease: 7,
                value: vec![],
            },
        ] {
            assert_eq!(Record::decode(&rec.encode()).unwrap(), rec);
        }
        assert!(Record::decode(&[9, 0]).is_err());
        assert!(Record::decode(&[RECORD_V1, KIND_PUT, 1]).is_err());
        assert_eq!(
            Rev::from_u128(Rev { main: 7, sub: 3 }.to_u128()),
            Rev { main: 7, sub: 3 }
        );
    }
}
