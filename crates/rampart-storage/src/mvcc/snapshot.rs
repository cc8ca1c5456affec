//! The whole MVCC state as one byte stream, for raft snapshots.
//!
//! Layout, version 1 (integers little-endian):
//!
//! ```text
//! header  := magic "RAMPMVCC" | u32 version | u32 crc32c(magic, version)
//! chunk   := u32 len (> 0) | payload[len] | u32 crc
//! payload := record*            (records never span chunks)
//! record  := u8 table | u32 key_len | key | u32 value_len | value
//!          | 0xFF | u64 record_count          (last record of the last chunk; then EOF)
//! ```
//!
//! A chunk's crc is crc32c over its payload, seeded with the previous chunk's crc (the header's
//! for the first chunk), so every chunk is checked before its records are used and a dropped or
//! reordered chunk breaks the chain. Keys and values are the tables' stored bytes as they are.
//!
//! Which tables a snapshot holds follows the data format in its `meta` records, which come
//! first: format 2 writes `meta`, `kv_by_rev` and `leases`; format 1 wrote `meta`, `kv`, `revs`
//! and `leases`, and such a snapshot is converted to format 2 as it is restored.

use std::io::{self, Read, Write};

use redb::{Database, ReadTransaction, ReadableTable, Table, TableDefinition};

use super::codec::{self, Record};
use super::{MvccError, FORMAT_VERSION, KV_BY_REV, LEASES, META, META_FORMAT_VERSION};

const MAGIC: &[u8; 8] = b"RAMPMVCC";
/// Version of the snapshot stream layout (not of the redb file, which is [`FORMAT_VERSION`]).
pub const SNAPSHOT_VERSION: u32 = 1;

/// Chunks are flushed once they reach this size.
const CHUNK_TARGET_BYTES: usize = 1 << 20;
/// A longer chunk is taken as corruption rather than allocated.
const MAX_CHUNK_BYTES: u32 = 256 << 20;

const TABLE_META: u8 = 1;
/// Format 1's `kv` table (user key ++ revision to format 1 record).
const TABLE_KV_V1: u8 = 2;
/// Format 1's `revs` table: derived from `kv`, skipped on restore.
const TABLE_REVS_V1: u8 = 3;
const TABLE_LEASES: u8 = 4;
/// Key: the revision as 16 little-endian bytes (redb's u128 encoding); value as stored.
const TABLE_KV_BY_REV: u8 = 5;
const END: u8 = 0xFF;

fn invalid(msg: impl Into<String>) -> MvccError {
    MvccError::InvalidSnapshot(msg.into())
}

struct ChunkWriter<'w> {
    out: &'w mut dyn Write,
    buf: Vec<u8>,
    crc: u32,
    records: u64,
}

impl ChunkWriter<'_> {
    fn record(&mut self, table: u8, key: &[u8], value: &[u8]) -> Result<(), MvccError> {
        let len = |n: usize| {
            u32::try_from(n)
                .map_err(|_| invalid(format!("a stored entry of {n} bytes is too large")))
        };
        self.buf.push(table);
        self.buf.extend_from_slice(&len(key.len())?.to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(&len(value.len())?.to_le_bytes());
        self.buf.extend_from_slice(value);
        self.records += 1;
        if self.buf.len() >= CHUNK_TARGET_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MvccError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let len = u32::try_from(self.buf.len())
            .ok()
            .filter(|n| *n <= MAX_CHUNK_BYTES)
            .ok_or_else(|| invalid(format!("a chunk of {} bytes is too large", self.buf.len())))?;
        self.crc = crc32c::crc32c_append(self.crc, &self.buf);
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&self.buf)?;
        self.out.write_all(&self.crc.to_le_bytes())?;
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<(), MvccError> {
        self.buf.push(END);
        let records = self.records;
        self.buf.extend_from_slice(&records.to_le_bytes());
        self.flush()?;
        self.out.flush()?;
        Ok(())
    }
}

fn table_records<K: redb::Key + 'static>(
    out: &mut ChunkWriter<'_>,
    id: u8,
    table: &impl ReadableTable<K, &'static [u8]>,
) -> Result<(), MvccError> {
    for entry in table.iter()? {
        let (k, v) = entry?;
        out.record(id, K::as_bytes(&k.value()).as_ref(), v.value())?;
    }
    Ok(())
}

/// Streams every table of `txn` into `w`.
pub(super) fn write(txn: &ReadTransaction, w: &mut dyn Write) -> Result<(), MvccError> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&header);
    header.extend_from_slice(&crc.to_le_bytes());
    w.write_all(&header)?;

    let mut out = ChunkWriter {
        out: w,
        buf: Vec::new(),
        crc,
        records: 0,
    };
    table_records(&mut out, TABLE_META, &txn.open_table(META)?)?;
    table_records(&mut out, TABLE_KV_BY_REV, &txn.open_table(KV_BY_REV)?)?;
    table_records(&mut out, TABLE_LEASES, &txn.open_table(LEASES)?)?;
    out.finish()
}

struct ChunkReader<'r> {
    input: &'r mut dyn Read,
    chunk: Vec<u8>,
    pos: usize,
    crc: u32,
}

enum Item<'a> {
    Entry {
        table: u8,
        key: &'a [u8],
        value: &'a [u8],
    },
    End {
        records: u64,
    },
}

fn read_exact(input: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<(), MvccError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => invalid(format!("truncated in {what}")),
        _ => MvccError::Io(e),
    })
}

impl<'r> ChunkReader<'r> {
    fn open(input: &'r mut dyn Read) -> Result<ChunkReader<'r>, MvccError> {
        let mut header = [0u8; 16];
        read_exact(input, &mut header, "the header")?;
        if &header[..8] != MAGIC {
            return Err(invalid("not an mvcc snapshot (bad magic)"));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
        if crc32c::crc32c(&header[..12]) != crc {
            return Err(invalid("header checksum mismatch"));
        }
        if version != SNAPSHOT_VERSION {
            return Err(invalid(format!(
                "snapshot version {version} is not supported (this build reads version {SNAPSHOT_VERSION})"
            )));
        }
        Ok(ChunkReader {
            input,
            chunk: Vec::new(),
            pos: 0,
            crc,
        })
    }

    fn next_chunk(&mut self) -> Result<(), MvccError> {
        let mut word = [0u8; 4];
        read_exact(self.input, &mut word, "a chunk length (no end record)")?;
        let len = u32::from_le_bytes(word);
        if len == 0 || len > MAX_CHUNK_BYTES {
            return Err(invalid(format!("chunk length {len} is out of range")));
        }
        self.chunk.resize(len as usize, 0);
        read_exact(self.input, &mut self.chunk, "a chunk")?;
        read_exact(self.input, &mut word, "a chunk checksum")?;
        let crc = crc32c::crc32c_append(self.crc, &self.chunk);
        if crc != u32::from_le_bytes(word) {
            return Err(invalid("chunk checksum mismatch"));
        }
        self.crc = crc;
        self.pos = 0;
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&[u8], MvccError> {
        let start = self.pos;
        let end = start.checked_add(n).filter(|end| *end <= self.chunk.len());
        let end = end.ok_or_else(|| invalid("a record runs past the end of its chunk"))?;
        self.pos = end;
        Ok(&self.chunk[start..end])
    }

    fn take_u32(&mut self) -> Result<usize, MvccError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }

    fn next(&mut self) -> Result<Item<'_>, MvccError> {
        if self.pos == self.chunk.len() {
            self.next_chunk()?;
        }
        let table = self.take(1)?[0];
        if table == END {
            let records = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
            if self.pos != self.chunk.len() {
                return Err(invalid("data after the end record"));
            }
            let mut probe = [0u8; 1];
            if self.input.read(&mut probe)? != 0 {
                return Err(invalid("data after the end record"));
            }
            return Ok(Item::End { records });
        }
        let key_len = self.take_u32()?;
        let key_at = self.pos;
        self.take(key_len)?;
        let value_len = self.take_u32()?;
        let value_at = self.pos;
        self.take(value_len)?;
        Ok(Item::Entry {
            table,
            key: &self.chunk[key_at..key_at + key_len],
            value: &self.chunk[value_at..value_at + value_len],
        })
    }
}

fn fixed<const N: usize>(key: &[u8], table: &str) -> Result<[u8; N], MvccError> {
    key.try_into()
        .map_err(|_| invalid(format!("{table} key of {} bytes, want {N}", key.len())))
}

fn clear<'t, K: redb::Key + 'static>(
    txn: &'t redb::WriteTransaction,
    def: TableDefinition<'_, K, &'static [u8]>,
) -> Result<Table<'t, K, &'static [u8]>, MvccError> {
    txn.delete_table(def)?;
    Ok(txn.open_table(def)?)
}

/// Replaces every table of `db` with the snapshot read from `r`, in one write transaction that
/// only commits once the whole stream has checked out; on any error nothing has changed. A
/// format 1 snapshot is converted to format 2 on the way in.
pub(super) fn restore(db: &Database, r: &mut dyn Read) -> Result<(), MvccError> {
    let mut input = ChunkReader::open(r)?;
    let txn = db.begin_write()?;
    {
        let mut meta = clear(&txn, META)?;
        let mut kv = clear(&txn, KV_BY_REV)?;
        let mut leases = clear(&txn, LEASES)?;
        // The data format the stream's meta records announced (they come before the data).
        let mut format = None;
        let mut count = 0u64;
        loop {
            match input.next()? {
                Item::End { records } if records == count => break,
                Item::End { records } => {
                    return Err(invalid(format!(
                        "end record counts {records} records, read {count}"
                    )))
                }
                Item::Entry { table, key, value } => {
                    match (table, format) {
                        (TABLE_META, _) => {
                            let name = std::str::from_utf8(key)
                                .map_err(|_| invalid("meta key is not UTF-8"))?;
                            if name == META_FORMAT_VERSION {
                                format = Some(codec::decode_u32(name, value)?);
                            }
                            meta.insert(name, value)?;
                        }
                        (TABLE_KV_BY_REV, Some(2)) => {
                            let rev = u128::from_le_bytes(fixed(key, "kv_by_rev")?);
                            codec::decode_entry(value)?;
                            kv.insert(rev, value)?;
                        }
                        (TABLE_KV_V1, Some(1)) => {
                            let (user_key, rev) = codec::split_kv_key(key)?;
                            let record = Record::decode(value)?;
                            kv.insert(
                                rev.to_u128(),
                                codec::encode_entry(user_key, &record).as_slice(),
                            )?;
                        }
                        (TABLE_REVS_V1, Some(1)) => {
                            fixed::<16>(key, "revs")?;
                        }
                        (TABLE_LEASES, _) => {
                            leases.insert(i64::from_le_bytes(fixed(key, "leases")?), value)?;
                        }
                        (other, format) => {
                            return Err(invalid(format!(
                                "table id {other} is not part of data format {format:?}"
                            )))
                        }
                    }
                    count += 1;
                }
            }
        }
        match format {
            Some(FORMAT_VERSION) => {}
            Some(1) => {
                meta.insert(META_FORMAT_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
            }
            other => {
                return Err(invalid(format!(
                    "snapshot holds data format {other:?}, this build reads 1 and {FORMAT_VERSION}"
                )))
            }
        }
        // The revisions must be there and readable.
        super::read_meta_revs(&meta)?;
    }
    txn.commit()?;
    Ok(())
}
