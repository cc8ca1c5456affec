//! Durable state of one member. Synchronous and free of network and async code, so that it can
//! be driven by a simulator as easily as by the raft layer.
//!
//! - [`log`]: the raft log, an append-only segmented file set with a checksum per record.
//! - [`meta`]: small files replaced atomically (vote, purge point), versioned and checksummed.
//! - [`mvcc`]: etcd's multi-version key-value model (revisions, ranges, txns, compaction) on redb.

pub mod log;
pub mod meta;
pub mod mvcc;
