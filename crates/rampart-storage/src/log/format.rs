//! Byte layout of segment files (documented in the parent module). Pure functions, no I/O, so the
//! layout lives in one place and the writer, the recovery scan and the readers cannot drift apart.

/// First bytes of every segment file.
pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"RPLOGSEG";
/// The segment format this build writes. Version 2 is version 1 plus a zero-filled tail: space
/// allocated ahead of the records, which begins with a record header of 16 zero bytes.
pub(super) const FORMAT_VERSION: u32 = 2;
/// The oldest segment format this build reads (and continues, in that format).
pub(super) const OLDEST_READABLE_VERSION: u32 = 1;
/// First format version whose segments may end in a zero-filled tail.
pub(super) const ZERO_TAIL_VERSION: u32 = 2;
pub(super) const SEGMENT_HEADER_LEN: u64 = 24;
pub(super) const RECORD_HEADER_LEN: u64 = 16;
/// Segment files are named `<first index, 20 digits>.seg` so that `ls` shows them in log order.
pub(super) const SEGMENT_SUFFIX: &str = ".seg";
const SEGMENT_NAME_DIGITS: usize = 20;

pub(super) fn segment_file_name(first_index: u64) -> String {
    format!(
        "{first_index:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    )
}

/// The first index a segment file name claims, or None if it is not a well-formed segment name.
pub(super) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(super) fn encode_segment_header(first_index: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&first_index.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The segment's first index and format version, or why the header is unusable.
pub(super) fn decode_segment_header(
    h: &[u8; SEGMENT_HEADER_LEN as usize],
) -> Result<(u64, u32), String> {
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad magic in segment header: not a rampart log segment".to_string());
    }
    let stored = u32::from_le_bytes(h[20..24].try_into().unwrap());
    let computed = crc32c::crc32c(&h[0..20]);
    if stored != computed {
        return Err(format!(
            "segment header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    // Checked after the checksum so that a flipped bit is reported as damage, not as a version
    // from the future.
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "unsupported segment format version {version} (this build reads versions \
             {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})"
        ));
    }
    Ok((u64::from_le_bytes(h[12..20].try_into().unwrap()), version))
}

/// crc32c over the index (8 bytes, little-endian) followed by the payload. Covering the index
/// means a record copied to the wrong place, or a flipped bit in its index, fails the check.
pub(super) fn record_checksum(index: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), payload)
}

/// Appends one encoded record to `buf`. The caller has checked that the payload fits in a u32.
pub(super) fn encode_record(buf: &mut Vec<u8>, index: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("caller checks the payload length");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&record_checksum(index, payload).to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(payload);
}

#[derive(Debug, Clone, Copy)]
pub(super) struct RecordHeader {
    pub(super) len: u32,
    pub(super) crc: u32,
    pub(super) index: u64,
}

pub(super) fn decode_record_header(h: &[u8; RECORD_HEADER_LEN as usize]) -> RecordHeader {
    RecordHeader {
        len: u32::from_le_bytes(h[0..4].try_into().unwrap()),
        crc: u32::from_le_bytes(h[4..8].try_into().unwrap()),
        index: u64::from_le_bytes(h[8..16].try_into().unwrap()),
    }
}

/// Checks a whole record (header and payload) read back from a segment against what the
/// in-memory index says it should be, and returns its payload.
pub(super) fn verify_record(bytes: &[u8], index: u64, len: u32) -> Result<&[u8], String> {
    let (h, payload) = bytes.split_at(RECORD_HEADER_LEN as usize);
    let h = decode_record_header(h.try_into().unwrap());
    if h.index != index || h.len != len || payload.len() != len as usize {
        return Err(format!(
            "record read back does not match the index: expected index {index} with {len} \
             payload bytes, found index {} with {} (file changed underneath us?)",
            h.index, h.len
        ));
    }
    let computed = record_checksum(index, payload);
    if computed != h.crc {
        return Err(format!(
            "checksum mismatch reading back record {index} (stored {:#010x}, computed {computed:#010x})",
            h.crc
        ));
    }
    Ok(payload)
}
