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

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own in-memory types into a Vec cannot fail: no I/O, no maps with non-string
    // keys restrictions in postcard. A failure would be a bug in a type's Serialize impl.
    postcard::to_allocvec(value).expect("postcard encoding of an in-memory value")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Encodes with a leading format version byte.
pub fn encode_versioned<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    out.extend_from_slice(&encode(value));
    out
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
}
