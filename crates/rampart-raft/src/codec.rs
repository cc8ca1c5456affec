//! Byte encodings owned by the raft layer. postcard (a stable, positional serde format) for
//! openraft's messages; every stored encoding starts with a format version byte. Checksums are the
//! storage layer's job (each log record and meta file carries one).

use std::io;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Entry;

/// Version byte in front of every log entry written by this build.
pub const ENTRY_FORMAT_V1: u8 = 1;
/// Version byte in front of the state machine's stored raft metadata and of snapshot metadata.
pub const META_FORMAT_V1: u8 = 1;

/// Room reserved before encoding, so that small messages are encoded without regrowing.
const ENCODE_RESERVE_BYTES: usize = 128;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_after(Vec::with_capacity(ENCODE_RESERVE_BYTES), value)
}

/// Appends the encoding of `value` to `out`.
pub(crate) fn encode_after<T: Serialize>(out: Vec<u8>, value: &T) -> Vec<u8> {
    // Serializing our own in-memory types into a Vec cannot fail: no I/O, no maps with non-string
    // keys restrictions in postcard. A failure would be a bug in a type's Serialize impl.
    postcard::to_extend(value, out).expect("postcard encoding of an in-memory value")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Encodes with a leading format version byte.
pub fn encode_versioned<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENCODE_RESERVE_BYTES);
    out.push(version);
    encode_after(out, value)
}

/// `#[serde(with = "codec::byte_string")]` for a `Vec<u8>`: serialized as a byte string, one
/// copy, rather than element by element. postcard writes both forms alike (a varint length,
/// then the bytes), so stored and sent data do not change; only the work per byte does.
pub mod byte_string {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            // Formats without byte strings send a sequence of numbers.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element()? {
                    v.push(b);
                }
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// Decodes bytes produced by [`encode_versioned`], refusing versions this build does not know.
pub fn decode_versioned<T: DeserializeOwned>(expected: u8, bytes: &[u8], what: &str) -> io::Result<T> {
    match bytes.split_first() {
        Some((v, rest)) if *v == expected => decode(rest),
        Some((v, _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: unknown format version {v} (this build reads version {expected})"),
        )),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what}: empty record"))),
    }
}

pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    encode_versioned(ENTRY_FORMAT_V1, entry)
}

pub fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    decode_versioned(ENTRY_FORMAT_V1, bytes, "raft log entry")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Request;
    use openraft::entry::RaftEntry;

    #[test]
    fn entry_roundtrip_and_version_check() {
        let log_id = openraft::testing::log_id::<crate::TypeConfig>(3, 1, 7);
        let entry = Entry::new_normal(log_id, Request::Kv(b"abc".to_vec()));
        let bytes = encode_entry(&entry);
        assert_eq!(bytes[0], ENTRY_FORMAT_V1);
        assert_eq!(decode_entry(&bytes).unwrap(), entry);

        let mut future = bytes.clone();
        future[0] = 9;
        let err = decode_entry(&future).unwrap_err().to_string();
        assert!(err.contains("unknown format version 9"), "{err}");
        assert!(decode_entry(&[]).is_err());
    }

    #[test]
    fn a_kv_request_encodes_as_before_byte_strings() {
        // The element-by-element form, as builds before `byte_string` wrote it.
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        enum Before {
            Kv(Vec<u8>),
        }
        let payload: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        let now = encode(&Request::Kv(payload.clone()));
        assert_eq!(now, encode(&Before::Kv(payload.clone())));
        assert_eq!(decode::<Request>(&now).unwrap(), Request::Kv(payload.clone()));
        assert_eq!(decode::<Before>(&now).unwrap(), Before::Kv(payload));
        // A versioned encoding is the version byte, then the same bytes.
        assert_eq!(encode_versioned(7, &Request::Kv(vec![1, 2]))[1..], encode(&Request::Kv(vec![1, 2]))[..]);
    }
}
