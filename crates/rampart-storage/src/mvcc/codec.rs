//! How keys and values are laid out in the redb tables.
//!
//! Every stored value starts with a record-format byte so that a later format can be read next to
//! this one. The key layouts are fixed by [`super::FORMAT_VERSION`].
//!
//! Format 2 keeps every version in one table keyed by revision ([`encode_entry`]). The format 1
//! layout (`kv` keyed by user key then revision, and `revs`) is still decoded here: a format 1
//! file is migrated when it opens, and a format 1 snapshot converted when it is restored.

use std::cmp::Ordering;

use rampart_proto::mvccpb::KeyValue;
use redb::{Key, TypeName, Value};

use super::MvccError;

/// First byte of every value in the format 1 `kv` and `revs` tables.
pub(crate) const RECORD_V1: u8 = 1;
/// First byte of every value in the format 2 `kv_by_rev` table.
pub(crate) const RECORD_V2: u8 = 2;

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

/// Encodes a format 1 `kv` table key (tests build format 1 stores with it).
#[cfg(test)]
pub(crate) fn kv_key(user_key: &[u8], rev: Rev) -> Vec<u8> {
    let mut k = Vec::with_capacity(user_key.len() + REV_SUFFIX);
    k.extend_from_slice(user_key);
    k.extend_from_slice(&(rev.main as u64).to_be_bytes());
    k.extend_from_slice(&(rev.sub as u64).to_be_bytes());
    k
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

/// A put's fields, in both formats: `be(create) be(version) be(lease)`, then the value.
const PUT_FIELDS_BYTES: usize = 24;

fn put_fields(v: &mut Vec<u8>, create_revision: i64, version: i64, lease: i64, value: &[u8]) {
    v.extend_from_slice(&create_revision.to_be_bytes());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(&lease.to_be_bytes());
    v.extend_from_slice(value);
}

/// Create revision, version and lease of put fields at least [`PUT_FIELDS_BYTES`] long.
fn put_meta(fields: &[u8]) -> (i64, i64, i64) {
    let int = |at: usize| i64::from_be_bytes(fields[at..at + 8].try_into().expect("8 bytes"));
    (int(0), int(8), int(16))
}

fn put_record(fields: &[u8]) -> Record {
    let (create_revision, version, lease) = put_meta(fields);
    Record::Put {
        create_revision,
        version,
        lease,
        value: fields[PUT_FIELDS_BYTES..].to_vec(),
    }
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
    /// Only tests write it now, to build format 1 stores.
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::Tombstone => vec![RECORD_V1, KIND_TOMBSTONE],
            Record::Put {
                create_revision,
                version,
                lease,
                value,
            } => {
                let mut v = Vec::with_capacity(2 + PUT_FIELDS_BYTES + value.len());
                v.push(RECORD_V1);
                v.push(KIND_PUT);
                put_fields(&mut v, *create_revision, *version, *lease, value);
                v
            }
        }
    }

    pub fn decode(v: &[u8]) -> Result<Record, MvccError> {
        if is_tombstone(v)? {
            return Ok(Record::Tombstone);
        }
        if v.len() < 2 + PUT_FIELDS_BYTES {
            return Err(MvccError::Corrupt(format!(
                "kv record of {} bytes is too short",
                v.len()
            )));
        }
        Ok(put_record(&v[2..]))
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

/// One stored version in format 2: the user key and what was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry<'a> {
    pub key: &'a [u8],
    pub tombstone: bool,
    /// For a put: `be(create) be(version) be(lease) value`; empty for a tombstone.
    fields: &'a [u8],
}

impl Entry<'_> {
    pub fn record(&self) -> Record {
        if self.tombstone {
            return Record::Tombstone;
        }
        put_record(self.fields)
    }

    /// A put's create revision, version and lease (without copying the value); None for a
    /// tombstone.
    pub fn put_meta(&self) -> Option<(i64, i64, i64)> {
        (!self.tombstone).then(|| put_meta(self.fields))
    }

    /// The lease of a put (0 for a tombstone), without copying the value.
    pub fn lease(&self) -> i64 {
        self.put_meta().map_or(0, |(_, _, lease)| lease)
    }

    /// The version as etcd's KeyValue, stored at `mod_revision`; None for a tombstone.
    pub fn key_value(&self, mod_revision: i64) -> Option<KeyValue> {
        self.record().into_key_value(self.key, mod_revision)
    }
}

/// Layout of a `kv_by_rev` value (format 2): `[RECORD_V2, kind]`, le32 key length, the key, then
/// for a put `be(create) be(version) be(lease) value`.
pub(crate) fn encode_entry(key: &[u8], record: &Record) -> Vec<u8> {
    let key_len = u32::try_from(key.len()).expect("keys are limited far below 4 GiB");
    let mut v = Vec::with_capacity(6 + key.len() + PUT_FIELDS_BYTES + record_value_len(record));
    v.push(RECORD_V2);
    match record {
        Record::Tombstone => {
            v.push(KIND_TOMBSTONE);
            v.extend_from_slice(&key_len.to_le_bytes());
            v.extend_from_slice(key);
        }
        Record::Put {
            create_revision,
            version,
            lease,
            value,
        } => {
            v.push(KIND_PUT);
            v.extend_from_slice(&key_len.to_le_bytes());
            v.extend_from_slice(key);
            put_fields(&mut v, *create_revision, *version, *lease, value);
        }
    }
    v
}

fn record_value_len(record: &Record) -> usize {
    match record {
        Record::Put { value, .. } => value.len(),
        Record::Tombstone => 0,
    }
}

pub(crate) fn decode_entry(v: &[u8]) -> Result<Entry<'_>, MvccError> {
    let (kind, rest) = match v {
        [RECORD_V2, kind, rest @ ..] => (*kind, rest),
        [version, ..] => {
            return Err(MvccError::Corrupt(format!(
                "unknown kv_by_rev record version {version}"
            )))
        }
        [] => return Err(MvccError::Corrupt("empty kv_by_rev record".into())),
    };
    if rest.len() < 4 {
        return Err(MvccError::Corrupt("kv_by_rev record without a key".into()));
    }
    let key_len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let Some(key) = rest[4..].get(..key_len).filter(|k| !k.is_empty()) else {
        return Err(MvccError::Corrupt(format!(
            "kv_by_rev record with a key of {key_len} bytes in {} bytes",
            v.len()
        )));
    };
    let after = &rest[4 + key_len..];
    let tombstone = match kind {
        KIND_TOMBSTONE if after.is_empty() => true,
        KIND_PUT if after.len() >= PUT_FIELDS_BYTES => false,
        KIND_TOMBSTONE | KIND_PUT => {
            return Err(MvccError::Corrupt(format!(
                "kv_by_rev record of kind {kind} has {} bytes after its key",
                after.len()
            )))
        }
        other => return Err(MvccError::Corrupt(format!("unknown kv record kind {other}"))),
    };
    Ok(Entry {
        key,
        tombstone,
        fields: after,
    })
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
    fn entry_roundtrip_and_rejects() {
        let put = Record::Put {
            create_revision: 2,
            version: 3,
            lease: 7,
            value: b"value".to_vec(),
        };
        let v = encode_entry(b"key", &put);
        let e = decode_entry(&v).unwrap();
        assert_eq!((e.key, e.tombstone, e.lease(), e.record()), (&b"key"[..], false, 7, put));
        let t = encode_entry(b"k", &Record::Tombstone);
        let e = decode_entry(&t).unwrap();
        assert_eq!((e.key, e.tombstone, e.lease(), e.record()), (&b"k"[..], true, 0, Record::Tombstone));
        assert_eq!(e.key_value(5), None);

        let mut wrong_version = v.clone();
        wrong_version[0] = 1;
        let mut long_key = v.clone();
        long_key[2] = 200;
        let mut bad_kind = t.clone();
        bad_kind[1] = 9;
        let short_put = &v[..v.len() - 5 - 24 + 23];
        for (bad, want) in [
            (&wrong_version[..], "unknown kv_by_rev record version 1"),
            (&long_key[..], "a key of 200 bytes"),
            (&bad_kind[..], "unknown kv record kind 9"),
            (short_put, "has 23 bytes after its key"),
            (&t[..2], "without a key"),
            (&[][..], "empty"),
            (&[RECORD_V2, KIND_PUT, 0, 0, 0, 0][..], "a key of 0 bytes"),
        ] {
            let err = decode_entry(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should say {want}");
        }
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
